"""Watching and interrupting a running job from a test: its ranks' pids, its progress in the file, signals."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np

from extract.output.hdf5_file import DoneFlags
from jobs import SCRIPT, clean_env, extract_command, process_tree


def start_extract(args: list, nproc: int | None = None, script: Path = SCRIPT, **kwargs) -> subprocess.Popen:
    """The job in the background (see jobs.run_extract); finish with `proc.communicate(timeout=...)`."""
    return subprocess.Popen(extract_command(args, nproc, script), env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def done_flags(out: Path) -> np.ndarray | None:
    """The file's /done as it is on disk now (read as rank 0's progress reports read it), or None while the
    file does not exist yet."""
    try:
        flags = DoneFlags(out)
    except OSError:  # not there yet
        return None
    try:
        return flags.read()
    finally:
        flags.close()


def wait_for_done(out: Path, proc: subprocess.Popen, condition: Callable[[np.ndarray], bool],
                  timeout: float = 120) -> np.ndarray:
    """Poll the file's /done until `condition(done)` holds, and return it; fails if the job ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = done_flags(out)
        if done is not None and condition(done):
            return done
        assert proc.poll() is None, f"the job ended early:\n{proc.communicate()[1]}"
        time.sleep(0.005)
    raise AssertionError(f"{out}: /done did not get there within {timeout} s")


def wait_for_done_rows(out: Path, proc: subprocess.Popen, at_least: int) -> np.ndarray:
    """Poll until at least `at_least` rows are marked done, while some are still to do."""
    done = wait_for_done(out, proc, lambda flags: flags.sum() >= at_least)
    assert done.sum() < done.size, "the job finished before it could be interrupted; give it more rows"
    return done


def worker_pids(agent_pid: int, count: int, timeout: float = 120) -> dict[int, int]:
    """{rank: pid} of the `count` workers torchrun (pid `agent_pid`) started, from /proc."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ranks = {pid: _environ(pid).get("RANK") for pid in process_tree(agent_pid)[1:]}
        workers = {int(rank): pid for pid, rank in ranks.items() if rank is not None}
        if len(workers) == count:
            return workers
        time.sleep(0.05)
    raise AssertionError(f"torchrun {agent_pid} did not start {count} workers within {timeout} s")


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def is_running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
