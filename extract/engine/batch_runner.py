"""Running one rank's batches, and recovering when the device runs out of memory.

A batch that does not fit is split in halves, and each half is retried, down to single rows. A row that
does not fit even alone is retried through the model's low-memory path (for ESM-2: attention computed in
chunks), and only if that also fails is it given up, by id, for the end of the job to report. After an
out-of-memory error the token budget for the rest of this rank's run drops to the size of the halves, so
the batches still to come are cut smaller before they are tried instead of failing first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from extract.contract import Embedder
from extract.engine.planning import padded_tokens, plan_batches
from extract.runtime.device import free_device_memory


@dataclass
class RunStats:
    rows: int = 0  # rows computed
    residues: int = 0
    residues_covered: int = 0  # residues the model's outputs cover (of a truncated row, the window's)
    tokens: int = 0  # tokens computed, padding included where the model pads
    split_batches: int = 0  # batches that ran out of memory and were computed in halves
    low_memory_rows: int = 0  # rows computed with the low-memory forward after running out of memory alone
    failed_rows: list[int] = field(default_factory=list)  # rows that did not fit even that way


@dataclass(frozen=True)
class InputRows:
    """What the runner knows of the input's rows."""

    fetch: Callable[[np.ndarray], list[str]]  # the rows' sequences
    ids: Sequence[str]
    lengths: np.ndarray  # residues per row
    covered: np.ndarray  # residues the model's outputs cover per row
    tokens: np.ndarray  # tokens of each of a row's model inputs
    model_inputs: np.ndarray  # model inputs per row (e.g. windows of a long protein)


class BatchRunner:
    """Embeds batches of rows and hands their values to `write(rows, values)`; `budget` is the padded-token
    limit, lowered after an out-of-memory error."""

    def __init__(self, model: Embedder, rows: InputRows, write: Callable[[np.ndarray, dict[str, np.ndarray]], None],
                 budget: int, log: logging.Logger):
        self.model = model
        self.rows = rows
        self.write = write
        self.budget = budget
        self.log = log
        self.stats = RunStats()

    def prepare(self, batch: np.ndarray) -> list[tuple[np.ndarray, Any]]:
        """A planned batch (rows longest first) cut to the current budget, each piece with its model inputs."""
        return [(piece, self.model.prepare(self.rows.fetch(piece))) for piece in self._pieces(batch)]

    def run(self, prepared: list[tuple[np.ndarray, Any]]) -> None:
        """Compute and write a prepared batch. A piece prepared before an out-of-memory error lowered the
        budget is cut again, its inputs prepared anew."""
        for rows, inputs in prepared:
            if self._padded(rows) > self.budget:
                for piece in self._pieces(rows):
                    self._compute(piece)
            else:
                self._compute(rows, inputs)

    def _pieces(self, rows: np.ndarray) -> list[np.ndarray]:
        if self._padded(rows) <= self.budget:
            return [rows]
        return plan_batches(rows, self.rows.tokens[rows], self.budget, self.rows.model_inputs[rows]).batches

    def _padded(self, rows: np.ndarray) -> int:
        return padded_tokens(self.rows.tokens[rows], self.rows.model_inputs[rows])

    def _compute(self, rows: np.ndarray, inputs: Any = None) -> None:
        """Compute and write `rows`, from their `inputs` if prepared already."""
        values = _unless_out_of_memory(
            lambda: self.model.embed(self.model.prepare(self.rows.fetch(rows)) if inputs is None else inputs))
        if values is None:
            if rows.size > 1:
                self._split(rows)
                return
            values = self._low_memory(int(rows[0]))
            if values is None:
                return
        self.write(rows, values)
        self.stats.rows += rows.size
        self.stats.residues += int(self.rows.lengths[rows].sum())
        self.stats.residues_covered += int(self.rows.covered[rows].sum())
        self.stats.tokens += self.model.computed_tokens(self.rows.tokens[rows], self.rows.model_inputs[rows])

    def _split(self, rows: np.ndarray) -> None:
        self.stats.split_batches += 1
        half = (rows.size + 1) // 2
        lowered = min(self.budget, self._padded(rows[:half]))
        self.log.warning("out of memory on %d rows (%d padded tokens); retrying in halves; token budget %d -> %d "
                         "for the rest of this rank's run", rows.size, self._padded(rows), self.budget, lowered)
        self.budget = lowered
        self._compute(rows[:half])
        self._compute(rows[half:])

    def _low_memory(self, row: int) -> dict[str, np.ndarray] | None:
        row_id, length = self.rows.ids[row], int(self.rows.lengths[row])
        self.log.warning("out of memory on row %d (%s, %d residues) alone; retrying with the low-memory forward",
                         row, row_id, length)
        values = _unless_out_of_memory(lambda: self.model.embed_low_memory(self.rows.fetch(np.array([row]))[0]))
        if values is None:
            self.log.error("row %d (%s, %d residues) does not fit in memory even with the low-memory forward; "
                           "left undone", row, row_id, length)
            self.stats.failed_rows.append(row)
        else:
            self.stats.low_memory_rows += 1
        return values


def _unless_out_of_memory(compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
    """`compute()`, or None after it ran out of device memory and that memory was given back."""
    try:
        return compute()
    except torch.OutOfMemoryError:
        pass  # leave the except block first: the exception's traceback still holds the batch's tensors
    free_device_memory()
    return None
