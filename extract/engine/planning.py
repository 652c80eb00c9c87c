"""Planning batches: longest first, cut to a padded-token budget, batch b to rank b % world_size.

Every rank computes the same plan from the same inputs without talking to the others.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Plan:
    batches: list[np.ndarray]  # row numbers, longest first within and across batches
    batch_tokens: np.ndarray  # padded tokens of each batch (`padded_tokens`)

    def for_rank(self, rank: int, world_size: int) -> list[np.ndarray]:
        return self.batches[rank::world_size]

    def tokens_per_rank(self, world_size: int) -> np.ndarray:
        return np.array([self.batch_tokens[r::world_size].sum() for r in range(world_size)], dtype=np.int64)

    def digest(self) -> str:
        """Names the plan: the same digest means the same batches in the same order."""
        digest = hashlib.sha256()
        for batch in self.batches:
            digest.update(np.int64(len(batch)).tobytes() + batch.astype(np.int64).tobytes())
        return digest.hexdigest()


def padded_tokens(tokens: np.ndarray, inputs: np.ndarray) -> int:
    """A batch's cost against the token budget: its longest model input's tokens times its model inputs
    (`tokens` and `inputs` per row), as if every input were padded to the longest."""
    return int(tokens.max()) * int(inputs.sum())


def plan_batches(rows: np.ndarray, tokens: np.ndarray, toks_per_batch: int, inputs: np.ndarray | None = None) -> Plan:
    """Cut `rows` into batches of at most `toks_per_batch` padded tokens; a row longer than the budget gets
    a batch of its own. Row i is `inputs[i]` model inputs (default 1, e.g. windows of a long protein) of
    up to `tokens[i]` tokens each, BOS/EOS included; a batch pads every input to its longest."""
    inputs = np.ones_like(tokens) if inputs is None else inputs
    order = np.lexsort((rows, -inputs, -tokens))
    rows, tokens, inputs = rows[order], tokens[order], inputs[order]
    del order
    inputs_before = np.zeros(len(inputs) + 1, dtype=np.int64)
    np.cumsum(inputs, out=inputs_before[1:])
    starts = []
    start = 0
    while start < len(rows):
        starts.append(start)
        # Sorted longest first, so the first row sets the batch's padded length.
        fits = inputs_before[start] + toks_per_batch // int(tokens[start])
        start = max(start + 1, int(np.searchsorted(inputs_before, fits, side="right")) - 1)
    bounds = starts[1:] + [len(rows)]
    batches = [rows[a:b] for a, b in zip(starts, bounds)]
    batch_tokens = np.array([padded_tokens(tokens[a:b], inputs[a:b]) for a, b in zip(starts, bounds)],
                            dtype=np.int64)
    return Plan(batches, batch_tokens)


@dataclass(frozen=True)
class PendingRows:
    """A plan over the rows to compute, one per distinct sequence, and the rows that take their values:
    every pending row takes the values of its source row (itself, or the first row with its sequence)."""

    plan: Plan
    toks_per_batch: int
    computed_tokens: int  # tokens of the computed rows' model inputs, all together (BOS and EOS included)
    computed: np.ndarray  # the rows the plan computes, ascending
    targets: np.ndarray  # the pending rows, ordered by source
    sources: np.ndarray  # the source of each target, ascending

    def copies(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows that take a computed batch's values, and for each the position in the batch of the row whose
        values it takes."""
        first = np.searchsorted(self.sources, batch, "left")
        counts = np.searchsorted(self.sources, batch, "right") - first
        return self.targets[concatenated_ranges(first, counts)], np.repeat(np.arange(len(batch)), counts)

    def summary_lines(self, lengths: np.ndarray, world_size: int) -> list[str]:
        """What the work amounts to, in the words both a dry run and the job's log use."""
        rows, computed = len(self.targets), len(self.computed)
        residues = int(lengths[self.targets].sum())
        saved = residues - int(lengths[self.computed].sum())
        padded = int(self.plan.batch_tokens.sum())
        padding = padded - self.computed_tokens
        per_rank = self.plan.tokens_per_rank(world_size)
        shown = ", ".join(f"{t:,}" for t in per_rank) if world_size <= 8 else f"{min(per_rank):,} to {max(per_rank):,}"
        return [
            f"rows: {rows:,} to write, {residues:,} residues",
            f"compute: {computed:,} rows ({_share(rows - computed, rows)} of the rows take the values of an "
            f"identical sequence, saving {_share(saved, residues)} of the residues)",
            f"batches: {len(self.plan.batches):,} of <= {self.toks_per_batch:,} padded tokens{self._oversized()}, "
            f"{padded:,} in all ({_share(padding, padded)} padding); plan {self.plan.digest()[:16]}",
            f"ranks: {world_size}, padded tokens per rank {shown}",
        ]

    def _oversized(self) -> str:
        """How many batches are one protein longer than the budget, which `plan_batches` gives a batch alone."""
        alone = int(np.count_nonzero(self.plan.batch_tokens > self.toks_per_batch))
        return f" ({alone:,} of them one protein longer than that, alone)" if alone else ""


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "0.00%"


def concatenated_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """range(starts[0], starts[0] + counts[0]), then the next range, and so on, as one array."""
    return np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(int(np.sum(counts)))


def plan_pending_rows(pending: np.ndarray, sources: np.ndarray | None, tokens: np.ndarray, toks_per_batch: int,
              inputs: np.ndarray | None = None) -> PendingRows:
    """Plan `pending` rows. `sources[row]` is the row whose values `row` takes (identical sequences are
    computed once); None computes every row itself. Row `row` is `inputs[row]` model inputs (default 1)
    of `tokens[row]` tokens each."""
    pending_sources = pending if sources is None else np.asarray(sources[pending])
    order = np.argsort(pending_sources, kind="stable")
    targets, pending_sources = pending[order], pending_sources[order]
    del order  # every rank plans every row: what it holds at once is its peak memory
    computed = pending_sources[np.diff(pending_sources, prepend=-1) != 0]
    tokens, inputs = tokens[computed], np.ones(len(computed), tokens.dtype) if inputs is None else inputs[computed]
    computed_tokens = int(np.dot(tokens.astype(np.int64), inputs))
    return PendingRows(plan=plan_batches(computed, tokens, toks_per_batch, inputs), toks_per_batch=toks_per_batch,
                       computed_tokens=computed_tokens, computed=computed, targets=targets, sources=pending_sources)
