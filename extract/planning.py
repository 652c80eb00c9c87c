"""Planning batches: longest first, cut to a padded-token budget, batch b to rank b % world_size.

Every rank computes the same plan from the same inputs without talking to the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Plan:
    batches: list[np.ndarray]  # row numbers, longest first within and across batches
    batch_tokens: np.ndarray  # padded tokens of each batch: its longest row x its size

    def for_rank(self, rank: int, world_size: int) -> list[np.ndarray]:
        return self.batches[rank::world_size]

    def tokens_per_rank(self, world_size: int) -> np.ndarray:
        return np.array([self.batch_tokens[r::world_size].sum() for r in range(world_size)], dtype=np.int64)


def plan_batches(rows: np.ndarray, tokens: np.ndarray, toks_per_batch: int) -> Plan:
    """Cut `rows` (with `tokens` each, BOS/EOS included) into batches of at most `toks_per_batch`
    padded tokens; a row longer than the budget gets a batch of its own."""
    order = np.lexsort((rows, -tokens))
    rows, tokens = rows[order], tokens[order]
    starts = []
    start = 0
    while start < len(rows):
        starts.append(start)
        # Sorted longest first, so the first row sets the batch's padded length.
        start += max(1, toks_per_batch // int(tokens[start]))
    bounds = starts[1:] + [len(rows)]
    batches = [rows[a:b] for a, b in zip(starts, bounds)]
    batch_tokens = np.array([tokens[a] * (b - a) for a, b in zip(starts, bounds)], dtype=np.int64)
    return Plan(batches, batch_tokens)
