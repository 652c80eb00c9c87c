"""Pooling a forward pass's representations into the stored outputs, on the device.

`mean`: mean over each protein's kept residues; `bos`: the BOS token of its first window;
`per_tok`: its kept residues, proteins concatenated in batch order. Representations are packed rows:
window w's tokens (BOS, residues, EOS) are rows `offsets[w]:offsets[w + 1]`.
"""

from __future__ import annotations

import numpy as np
import torch

from extract.long_sequences import BatchLayout
from extract.planning import concatenated_ranges

OUTPUTS = ("mean", "bos", "per_tok")


def dataset_name(output: str, layer: int) -> str:
    return f"{output}/layer_{layer}"


def pool(rows: dict[int, torch.Tensor], offsets: np.ndarray, layout: BatchLayout,
         outputs: list[str]) -> dict[str, np.ndarray]:
    """{dataset name: float32 array}: (proteins, width) for mean and bos, (kept residues, width) for per_tok."""
    device = next(iter(rows.values())).device
    kept = torch.as_tensor(_kept_rows(offsets, layout), device=device)
    bos = torch.as_tensor(np.asarray(offsets)[layout.first_window], device=device)
    embedded = torch.as_tensor(layout.embedded, device=device)
    pooled = {}
    for layer, values in rows.items():
        residues = values.index_select(0, kept) if {"mean", "per_tok"} & set(outputs) else None
        if "mean" in outputs:
            # segment_reduce sums each protein's rows in order (no atomics): the same result on every run.
            sums = torch.segment_reduce(residues.float(), "sum", lengths=embedded)
            pooled[dataset_name("mean", layer)] = sums / embedded.unsqueeze(1)
        if "bos" in outputs:
            pooled[dataset_name("bos", layer)] = values.index_select(0, bos)
        if "per_tok" in outputs:
            pooled[dataset_name("per_tok", layer)] = residues
    return _to_host(pooled)


def _kept_rows(offsets: np.ndarray, layout: BatchLayout) -> np.ndarray:
    """The rows of the residues the layout keeps, window by window (BOS is each window's row 0). Windows
    are in protein order, so these are each protein's embedded residues in order, proteins in batch order."""
    first = np.asarray(offsets)[:-1] + 1 + layout.keep_start  # each window's first kept row
    return concatenated_ranges(first, layout.keep_stop - layout.keep_start)


def _to_host(pooled: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """float32 numpy arrays; from a GPU through pinned memory, every copy queued before one wait."""
    if not pooled or next(iter(pooled.values())).device.type != "cuda":
        return {name: values.float().cpu().numpy() for name, values in pooled.items()}
    host = {name: torch.empty(values.shape, dtype=torch.float32, pin_memory=True) for name, values in pooled.items()}
    for name, values in pooled.items():
        host[name].copy_(values.float(), non_blocking=True)
    torch.cuda.current_stream(next(iter(pooled.values())).device).synchronize()
    return {name: values.numpy() for name, values in host.items()}
