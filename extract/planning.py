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


def plan_batches(rows: np.ndarray, tokens: np.ndarray, toks_per_batch: int, inputs: np.ndarray | None = None) -> Plan:
    """Cut `rows` into batches of at most `toks_per_batch` padded tokens; a row longer than the budget gets
    a batch of its own. Row i is `inputs[i]` model inputs (default 1, e.g. windows of a long protein) of
    up to `tokens[i]` tokens each, BOS/EOS included; a batch pads every input to its longest."""
    inputs = np.ones_like(tokens) if inputs is None else inputs
    order = np.lexsort((rows, -inputs, -tokens))
    rows, tokens, inputs = rows[order], tokens[order], inputs[order]
    inputs_before = np.concatenate([[0], np.cumsum(inputs)])
    starts = []
    start = 0
    while start < len(rows):
        starts.append(start)
        # Sorted longest first, so the first row sets the batch's padded length.
        fits = inputs_before[start] + toks_per_batch // int(tokens[start])
        start = max(start + 1, int(np.searchsorted(inputs_before, fits, side="right")) - 1)
    bounds = starts[1:] + [len(rows)]
    batches = [rows[a:b] for a, b in zip(starts, bounds)]
    batch_tokens = np.array([tokens[a] * (inputs_before[b] - inputs_before[a]) for a, b in zip(starts, bounds)],
                            dtype=np.int64)
    return Plan(batches, batch_tokens)
