"""Starting jobs the way clusters do, from tests: the launcher, and the Slurm templates through the
stand-in sbatch/srun/scontrol in tests/fake_slurm."""

from __future__ import annotations

import os
import pty
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from extract.output.hdf5_file import DoneFlags
from jobs import FP32, REPO, clean_env

# Small batches, so that even 16 short proteins take several; progress reports every 50 ms.
SMALL_JOB_FLAGS = ("--include", "mean", "per_tok", "--toks-per-batch", "500", "--progress-seconds", "0.05", *FP32)
FAKE_SLURM = Path(__file__).resolve().parent / "fake_slurm"
LOCAL_LAUNCHER = REPO / "launch" / "local.sh"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(**settings) -> dict:
    """The environment for the launcher: this Python first on PATH, the given settings as strings."""
    env = clean_env()
    env.update(PYTHON=sys.executable, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    env.update({name: str(value) for name, value in settings.items()})
    return env


def slurm_env(state_dir: Path, **settings) -> dict:
    """The environment of a user submitting from anywhere, with the stand-in Slurm commands on PATH."""
    state_dir.mkdir(parents=True, exist_ok=True)
    env = launch_env(FAKE_SLURM_DIR=state_dir, ESM_FEATURES_DIR=REPO, RDZV_PORT=free_port(), **settings)
    env["PATH"] = f"{FAKE_SLURM}{os.pathsep}{env['PATH']}"
    return env


def sbatch_command(template: str, *options, script_args: tuple = ()) -> list[str]:
    """`sbatch OPTIONS slurm/TEMPLATE SCRIPT_ARGS`."""
    return [str(FAKE_SLURM / "sbatch"), *map(str, options), str(REPO / "slurm" / template), *map(str, script_args)]


def sbatch(template: str, env: dict, cwd: Path, *options, script_args: tuple = (),
           timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(sbatch_command(template, *options, script_args=script_args), env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def wait_for_rows(out: Path, job: subprocess.Popen, timeout: float = 240) -> int:
    """Wait until some rows of `out` are done (read as rank 0's progress does), or the job ends."""
    deadline = time.monotonic() + timeout
    while not out.exists():
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before creating its output"
        time.sleep(0.02)
    flags = DoneFlags(out)
    try:
        while (done := int(flags.read().sum())) == 0:
            assert job.poll() is None and time.monotonic() < deadline, "the job ended before writing a row"
            time.sleep(0.02)
    finally:
        flags.close()
    return done


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain `text` (leftovers of a job)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command:
            found.append(command)
    return found


def run_on_terminal(command: list[str], env: dict, timeout: float = 300) -> tuple[int, str]:
    """Run `command` with its stderr on a pseudo-terminal; its exit code and what the terminal showed."""
    leader, follower = pty.openpty()
    shown = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed with the last process holding it
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=follower, timeout=timeout)
    finally:
        os.close(follower)
        reader.join(timeout=10)
        os.close(leader)
    return proc.returncode, shown.decode(errors="replace")
