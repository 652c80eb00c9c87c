"""One job per output file: rank 0 holds an exclusive lock on `OUT.h5.lock` for the whole job.

`flock` rather than a lock file created with O_EXCL: the kernel drops a flock when its holder dies, even by
SIGKILL, so a crashed job never leaves a stale lock that would block the rerun that resumes it. On NFS the
Linux client turns flock into a byte-range lock the server sees, so it holds across nodes; Lustre needs the
`flock` mount option (with `localflock` it holds only within a node), BeeGFS its global file locks. Where the
file system refuses locks altogether the job says so and runs unprotected.

Taking the lock is also the first touch of the output's directory, so an output that cannot be written is
refused before any input is read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from extract.errors import UserError
from extract.runtime.identity import RankIdentity
from extract.runtime.collectives import leader_decides

UNSUPPORTED = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL)


def lock_path(out: Path) -> Path:
    return out.with_name(out.name + ".lock")


class OutputLock:
    def __init__(self, out: Path, log: logging.Logger):
        self.out = out
        self.path = lock_path(out)
        self.log = log
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise UserError saying who holds it."""
        while self._fd is None:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = _read_holder(fd)
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
                    raise UserError(f"{self.out}: in use by another job ({holder}); wait for it to end "
                                    f"or choose another --out") from None
                if err.errno not in UNSUPPORTED:
                    raise UserError(f"{self.path}: cannot lock the output ({err.strerror})") from None
                self.log.warning("%s: this file system does not support flock (%s); make sure no other job "
                                 "writes %s at the same time", self.path, err.strerror, self.out)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                return
            if _same_file(fd, self.path):
                self._fd = fd
            else:  # a previous holder removed the file between our open and our lock: take the new one
                os.close(fd)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n".encode(), 0)

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"{self.out}: cannot write in {self.out.parent} ({err.strerror})") from None

    def release(self) -> None:
        """Remove the lock file, then let go: a job that opened the old file retries on a fresh one."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _read_holder(fd: int) -> str:
    text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    return text or "holder unknown"


@contextlib.contextmanager
def held_by_leader(identity: RankIdentity, out: Path, log: logging.Logger) -> Iterator[None]:
    """Rank 0 holds the output's lock for the duration; if it cannot, every rank raises its UserError."""
    lock = OutputLock(out, log)
    try:
        leader_decides(identity, lock.acquire)
        yield
    finally:
        lock.release()
