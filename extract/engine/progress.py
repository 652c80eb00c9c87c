"""Progress you can watch: rank 0 reports rows and residues done across ALL ranks, every N seconds.

No collective is involved. Every rank marks its rows in the output's /done flags as it writes them, so
rank 0 re-reads those bytes (read-only positioned reads, see `hdf5_file.DoneFlags`) from a background
thread. A slow or dead rank therefore never stalls the report, and the report never stalls a rank;
an all_reduce at report time would block rank 0 until every peer reached it. Lines go to the log; when
stderr is a terminal, one progress bar is redrawn in place instead.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

import numpy as np

from extract.output.hdf5_file import DoneFlags

BAR_SECONDS = 1.0  # a bar is redrawn at least this often
BAR_WIDTH = 30


@dataclass(frozen=True)
class Snapshot:
    rows: int
    total_rows: int
    residues: int
    total_residues: int
    residues_per_second: float  # since this run started

    @property
    def fraction(self) -> float:
        return self.residues / self.total_residues if self.total_residues else 1.0

    @property
    def eta_seconds(self) -> float | None:
        if self.residues_per_second <= 0:
            return None
        return (self.total_residues - self.residues) / self.residues_per_second


def short_count(value: float) -> str:
    """1234 -> '1.2k', 5600000 -> '5.6M'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


def short_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def status_line(s: Snapshot) -> str:
    return (f"{s.rows}/{s.total_rows} rows, {short_count(s.residues)}/{short_count(s.total_residues)} residues "
            f"({100 * s.fraction:.0f}%), {short_count(s.residues_per_second)} residues/s, "
            f"ETA {short_duration(s.eta_seconds)}")


def bar(s: Snapshot) -> str:
    filled = int(BAR_WIDTH * s.fraction)
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {status_line(s)}"


class ProgressWatcher:
    """A background thread that reads the /done flags every `interval` seconds and reports."""

    def __init__(self, out: Path, lengths: np.ndarray, interval: float, log: logging.Logger, stream: TextIO):
        self._flags = DoneFlags(out)
        self._lengths = lengths
        self._log = log
        self._stream = stream
        self._as_bar = stream.isatty()
        self._interval = min(interval, BAR_SECONDS) if self._as_bar else interval
        self._started = time.monotonic()
        self._residues_at_start = self._residues_done(self._flags.read())
        self._reported = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="esm_features progress", daemon=True)
        self._thread.start()

    def _residues_done(self, flags: np.ndarray) -> int:
        return int(self._lengths[flags.astype(bool)].sum())

    def snapshot(self) -> Snapshot:
        flags = self._flags.read()
        residues = self._residues_done(flags)
        elapsed = time.monotonic() - self._started
        rate = (residues - self._residues_at_start) / elapsed if elapsed > 0 else 0.0
        return Snapshot(rows=int(np.count_nonzero(flags)), total_rows=flags.size, residues=residues,
                        total_residues=int(self._lengths.sum()), residues_per_second=rate)

    def _report(self, snapshot: Snapshot) -> None:
        if self._as_bar:
            self._stream.write(f"\r{bar(snapshot)}")
            self._stream.flush()
        else:
            self._log.info("progress: %s", status_line(snapshot))
        self._reported = True

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._report(self.snapshot())
            except OSError as err:
                self._log.warning("progress reports stop: cannot read the /done flags (%s)", err)
                return

    def stop(self) -> None:
        """End the thread; close a series of reports with the final state (a bar always ends its line)."""
        self._stop.set()
        self._thread.join()
        if self._reported or self._as_bar:
            with contextlib.suppress(OSError):
                self._report(self.snapshot())
        if self._as_bar:
            self._stream.write("\n")
            self._stream.flush()
        self._flags.close()


@contextlib.contextmanager
def watch(out: Path, lengths: np.ndarray, interval: float | None, log: logging.Logger,
          stream: TextIO | None = None) -> Iterator[None]:
    """Report progress of the job filling `out` every `interval` seconds while inside; None: stay quiet."""
    if interval is None:
        yield
        return
    watcher = ProgressWatcher(out, lengths, interval, log, stream or sys.stderr)
    try:
        yield
    finally:
        watcher.stop()
