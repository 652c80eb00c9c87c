"""Starting jobs the way clusters do, from tests: the launcher's environment, waiting for a job's first rows,
and finding what is left of a job."""

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


def rows_done(out: Path) -> int:
    """How many rows of `out` are done so far, read as rank 0's progress does (0 before it exists)."""
    if not out.exists():
        return 0
    flags = DoneFlags(out)
    try:
        return int(flags.read().sum())
    finally:
        flags.close()


def wait_for_rows(out: Path, job, timeout: float = 240) -> int:
    """Wait until some rows of `out` are done, or the job ends: `job` is a subprocess.Popen or anything else
    whose poll() is None while it runs (a Slurm job of tests/real_slurm)."""
    deadline = time.monotonic() + timeout
    while (done := rows_done(out)) == 0:
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before writing a row"
        time.sleep(0.02)
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


def worker_pids(out: Path) -> list[int]:
    """Process ids of the ranks (torchrun's workers, not the agents) of a job writing `out`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if str(out) in words and any(w.endswith("esm_features.py") for w in words) and \
                not any(w.endswith("torchrun_agent.py") for w in words):
            found.append(int(cmdline.parent.name))
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
