"""A real Slurm cluster on this machine, for the tests: munged, slurmctld and two slurmd as the nodes n1 and n2
(both this host, reached at 127.0.0.1), all in one directory and addressed by SLURM_CONF alone.

The node names do not resolve as host names (they are not in /etc/hosts), as on clusters whose NodeName
differs from the host's name: a job must ask the cluster for a node's address. Partitions: `low` (the
default; preemptible, GraceTime 0), `low_grace` (preemptible, GraceTime GRACE_SECONDS) and `high` (preempts
both). Job credentials live CREDENTIAL_SECONDS, so a requeued job may start again after about that long
instead of Slurm's default of two minutes.

Every daemon is stopped by its process id at the end, and so is every process left from a job; the daemons
also get SIGTERM should the test process itself die (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from cluster_jobs import free_port

NODES = ("n1", "n2")
GRACE_SECONDS = 20
CPUS_PER_NODE = 16  # more than the machine has (SlurmdParameters=config_overrides): the jobs mostly wait
CREDENTIAL_SECONDS = 5
MARKER = "ESM_FEATURES_TEST_CLUSTER"  # in the environment of every daemon and job process of one cluster
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
_PR_SET_PDEATHSIG = 1


def missing_reason() -> str | None:
    """Why no real cluster can start here, or None when one can."""
    absent = [name for name in PROGRAMS if shutil.which(name) is None]
    if absent:
        return f"Slurm is not installed ({', '.join(absent)} missing; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the test cluster runs its daemons as root (SlurmUser=root)"
    return None


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def slurm_conf(root: Path, munge_socket: Path) -> str:
    host = socket.gethostname()
    nodes = "\n".join(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} CPUs={CPUS_PER_NODE} "
                      "State=UNKNOWN" for name in NODES)
    every_node = ",".join(NODES)
    return f"""\
ClusterName=esmtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire={CREDENTIAL_SECONDS}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd_%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd_%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MpiDefault=none
JobRequeue=1
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=3600
KillWait=30
InactiveLimit=0
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
{nodes}
PartitionName=low Nodes={every_node} Default=YES PriorityTier=1 PreemptMode=REQUEUE GraceTime=0 MaxTime=INFINITE State=UP
PartitionName=low_grace Nodes={every_node} PriorityTier=1 PreemptMode=REQUEUE GraceTime={GRACE_SECONDS} MaxTime=INFINITE State=UP
PartitionName=high Nodes={every_node} PriorityTier=10 PreemptMode=OFF MaxTime=INFINITE State=UP
"""


class Cluster:
    """A running cluster: `env()` is the environment of a user on it, `stop()` ends it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.daemons: list[subprocess.Popen] = []

    @classmethod
    def start(cls, root: Path) -> "Cluster":
        cluster = cls(root)
        try:
            cluster._start_daemons()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def env(self, base: dict | None = None, **settings) -> dict:
        env = dict(os.environ if base is None else base)
        env.update(SLURM_CONF=str(self.conf), **{MARKER: str(self.root)})
        env.update({name: str(value) for name, value in settings.items()})
        return env

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        """A Slurm command (scontrol, scancel, sinfo ...) against this cluster."""
        done = subprocess.run(command, env=self.env(), capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: exit code {done.returncode}: {done.stderr.strip()}")
        return done

    def sbatch(self, script: Path, env: dict, cwd: Path, *options, script_args: tuple = ()) -> "Job":
        """Submit `script` as a user with environment `env` would, from `cwd`."""
        done = subprocess.run(["sbatch", "--parsable", *map(str, options), str(script), *map(str, script_args)],
                              env=self.env(env), cwd=cwd, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"sbatch {script.name}: {done.stderr.strip()}")
        return Job(self, done.stdout.strip())

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted(self.root.glob("*.log")))

    # ---- starting and stopping -----------------------------------------------------------------------

    def _start_daemons(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(parents=True)
        for directory in (self.root, munge):  # munged wants every directory above its socket searchable
            directory.chmod(0o755)
        key = munge / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        munge_socket = munge / "munge.socket"
        self._daemon("munged", "--foreground", "--force", f"--socket={munge_socket}", f"--key-file={key}",
                     f"--pid-file={munge}/munged.pid", f"--seed-file={munge}/munged.seed",
                     f"--log-file={self.root}/munged.log")
        self._wait(lambda: munge_socket.exists(), "munged to open its socket")
        for sub in ("state", *(f"spool/{name}" for name in NODES)):
            (self.root / sub).mkdir(parents=True)
        self.conf.write_text(slurm_conf(self.root, munge_socket))
        self._daemon("slurmctld", "-D", "-f", str(self.conf))
        for name in NODES:
            self._daemon("slurmd", "-D", "-N", name, "-f", str(self.conf))
        self._wait(self._nodes_idle, "both nodes to be idle")

    def _daemon(self, *command: str) -> None:
        self.daemons.append(subprocess.Popen(command, env=self.env(), stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                             preexec_fn=_die_with_parent))

    def _nodes_idle(self) -> bool:
        shown = self.run("sinfo", "--noheader", "--Node", "--partition=low", "--format=%N %T", check=False)
        return sorted(shown.stdout.split()) == sorted([*NODES, "idle", "idle"])

    def _wait(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            ended = [" ".join(map(str, d.args[:1])) for d in self.daemons if d.poll() is not None]
            if ended or time.monotonic() > deadline:
                raise RuntimeError(f"test cluster: waited for {what}; ended: {ended or 'none'}\n{self.logs()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the Slurm daemons, then every process left from a job, then munged; each by its pid."""
        slurm, munged = self.daemons[1:], self.daemons[:1]
        _terminate(slurm)
        for _ in range(20):  # a dying batch script may still start a process or two
            leftovers = processes_of(self.root)
            if not leftovers:
                break
            for pid in leftovers:
                _kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        _terminate(munged)


class Job:
    """A job (or one array task, as `<array job id>_<task id>`) on a cluster."""

    def __init__(self, cluster: Cluster, job_id: str) -> None:
        self.cluster, self.id = cluster, job_id

    def fields(self) -> dict[str, str]:
        """`scontrol show job` as fields (JobState, Restarts, ExitCode, Reason ...)."""
        shown = self.cluster.run("scontrol", "show", "job", "--oneliner", self.id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", shown.splitlines()[0]))

    def poll(self) -> str | None:
        """The job's final state once it has ended for good, else None (as Popen.poll)."""
        state = self.fields()["JobState"]
        return state if state in FINAL_STATES else None

    def wait(self, timeout: float = 240) -> dict[str, str]:
        """The job's fields once it has ended for good."""
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"job {self.id} has not ended after {timeout} s: {self.fields()}"
                                     f"\n{self.cluster.logs()}")
            time.sleep(0.2)
        return self.fields()


def _terminate(daemons: list[subprocess.Popen]) -> None:
    for daemon in daemons:
        if daemon.poll() is None:
            daemon.terminate()
    for daemon in daemons:
        try:
            daemon.wait(timeout=15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def _kill(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def processes_of(root: Path) -> list[int]:
    """Process ids of running processes that belong to the cluster in `root` (daemons, job steps, jobs)."""
    mark = f"{MARKER}={root}\0".encode()
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if mark in environ and int(entry) != os.getpid():
            found.append(int(entry))
    return found
