"""Proteins longer than the model's window: keep the first window's residues (truncate), or cover the
whole protein with overlapping windows and take each residue from the window where it is most central.

Everything here counts residues (no BOS/EOS), so it serves any model with a fixed input window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from extract.errors import UserError

TRUNCATE, WINDOW = "truncate", "window"
MODES = (TRUNCATE, WINDOW)


@dataclass(frozen=True)
class BatchLayout:
    """The model inputs (windows) of a batch of proteins and which of their residues are kept.

    Windows are ordered by protein, then by start, so concatenating every window's kept residues
    gives each protein's embedded residues in order, proteins in batch order.
    """

    protein: np.ndarray  # per window: index of its protein in the batch
    start: np.ndarray  # per window: first residue, in protein coordinates
    stop: np.ndarray  # per window: one past its last residue
    keep_start: np.ndarray  # per window: first kept residue, in window coordinates
    keep_stop: np.ndarray  # per window: one past its last kept residue
    embedded: np.ndarray  # per protein: residues kept over all its windows
    first_window: np.ndarray  # per protein: index of its first window

    def window_sequences(self, sequences: list[str]) -> list[str]:
        return [sequences[p][a:b] for p, a, b in zip(self.protein, self.start, self.stop)]


@dataclass(frozen=True)
class LongSequencePolicy:
    mode: str
    window: int  # residues per model input: the truncation length
    overlap: int  # residues shared by neighbouring windows (window mode)

    @classmethod
    def from_options(cls, mode: str, window: int, overlap: int | None) -> "LongSequencePolicy":
        """Validate the command line's choice; the default overlap is a quarter of the window."""
        if window < 1:
            raise UserError(f"--truncation-seq-length {window}: must be at least 1")
        if mode == TRUNCATE:
            if overlap is not None:
                raise UserError("--window-overlap applies only with --long-sequences window")
            return cls(mode, window, 0)
        if overlap is None:
            overlap = window // 4
        if not 0 <= overlap < window:
            raise UserError(f"--window-overlap {overlap}: must be at least 0 and less than the window of "
                            f"{window} residues (--truncation-seq-length)")
        return cls(mode, window, overlap)

    def settings(self) -> dict:
        if self.mode == TRUNCATE:
            return {"long_sequences": TRUNCATE}
        return {"long_sequences": WINDOW, "window_length": self.window, "window_overlap": self.overlap}

    def windows_per_protein(self, lengths: np.ndarray) -> np.ndarray:
        """The fewest windows whose neighbours share at least `overlap` residues."""
        if self.mode == TRUNCATE:
            return np.ones_like(lengths)
        stride = self.window - self.overlap
        return np.maximum(1, -(-(lengths - self.overlap) // stride))

    def residues_covered(self, lengths: np.ndarray) -> np.ndarray:
        """Residues each protein's stored representations cover."""
        return np.minimum(lengths, self.window) if self.mode == TRUNCATE else lengths.copy()

    def window_starts(self, length: int) -> np.ndarray:
        """Window starts spread evenly from 0 to length - window: neighbours overlap by >= `overlap`."""
        count = int(self.windows_per_protein(np.array([length]))[0])
        if count == 1:
            return np.zeros(1, dtype=np.int64)
        return np.arange(count, dtype=np.int64) * (length - self.window) // (count - 1)

    def layout(self, lengths: np.ndarray) -> BatchLayout:
        lengths = np.asarray(lengths, dtype=np.int64)
        counts = self.windows_per_protein(lengths)
        embedded = self.residues_covered(lengths)
        first_window = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        # A protein of one window keeps all it holds; only the rare longer ones need working out.
        start, keep_start = np.zeros((2, counts.sum()), dtype=np.int64)
        stop = np.repeat(embedded, counts)
        keep_stop = stop.copy()
        for protein in np.flatnonzero(counts > 1):
            windows = slice(first_window[protein], first_window[protein] + counts[protein])
            start[windows], stop[windows], keep_start[windows], keep_stop[windows] = self._protein_windows(
                int(lengths[protein]))
        return BatchLayout(np.repeat(np.arange(len(lengths)), counts), start, stop, keep_start, keep_stop,
                           embedded, first_window)

    def _protein_windows(self, length: int) -> tuple[np.ndarray, ...]:
        """One protein's windows: (start, stop, keep_start, keep_stop)."""
        starts = self.window_starts(length)
        stops = np.minimum(starts + self.window, length)
        # Most central = nearest window centre; the centres of neighbours i, i+1 are s_i + (w-1)/2 and
        # s_{i+1} + (w-1)/2, so residue p moves to window i+1 once 2p > s_i + s_{i+1} + w - 1 (ties stay
        # in the earlier window).
        bounds = (starts[:-1] + starts[1:] + self.window - 1) // 2 + 1
        keep_from = np.concatenate([[0], bounds])
        keep_to = np.concatenate([bounds, [stops[-1]]])
        return starts, stops, keep_from - starts, keep_to - starts
