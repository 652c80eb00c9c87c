"""Pooling a forward pass's representations into the stored outputs, on the device.

`mean`: mean over each protein's kept residues; `bos`: the BOS token of its first window;
`per_tok`: its kept residues, proteins concatenated in batch order. Representations are packed rows:
window w's tokens (BOS, residues, EOS) are rows `offsets[w]:offsets[w + 1]`.
"""

from __future__ import annotations

import numpy as np
import torch

from extract.runtime.device import to_device
from extract.models.long_sequences import BatchLayout
from extract.engine.planning import concatenated_ranges

OUTPUTS = ("mean", "bos", "per_tok")
PINNED_RESULTS_MAX_BYTES = 256 << 20


def dataset_name(output: str, layer: int) -> str:
    return f"{output}/layer_{layer}"


def pool(rows: dict[int, torch.Tensor], offsets: np.ndarray, layout: BatchLayout,
         outputs: list[str]) -> dict[str, np.ndarray]:
    """{dataset name: float32 array}: (proteins, width) for mean and bos, (kept residues, width) for per_tok."""
    device = next(iter(rows.values())).device
    kept, bos, embedded = (to_device(torch.as_tensor(host), device) for host in (
        _kept_rows(offsets, layout), np.asarray(offsets)[layout.first_window], layout.embedded))
    pooled = {}
    for layer, values in rows.items():
        residues = values.index_select(0, kept) if {"mean", "per_tok"} & set(outputs) else None
        if "mean" in outputs:
            # segment_reduce sums each protein's rows in order (no atomics): the same result on every run.
            # `unsafe`: the lengths are right by construction; checking them would wait for the device.
            sums = torch.segment_reduce(residues.float(), "sum", lengths=embedded, unsafe=True)
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
    """float32 numpy arrays; from a GPU through pinned memory, every copy queued before one wait.

    Not results bigger than PINNED_RESULTS_MAX_BYTES (per-residue outputs of large batches): PyTorch keeps
    pinned blocks cached, rounded up to a power of two, and the writes hold up to three batches' results,
    so pinning those would lock tens of GB of host memory per rank; writing them takes longer than the
    copy anyway."""
    size = sum(values.numel() for values in pooled.values()) * 4
    if not pooled or next(iter(pooled.values())).device.type != "cuda" or size > PINNED_RESULTS_MAX_BYTES:
        return {name: values.float().cpu().numpy() for name, values in pooled.items()}
    host = {name: torch.empty(values.shape, dtype=torch.float32, pin_memory=True) for name, values in pooled.items()}
    for name, values in pooled.items():
        host[name].copy_(values.float(), non_blocking=True)
    torch.cuda.current_stream(next(iter(pooled.values())).device).synchronize()
    return {name: values.numpy() for name, values in host.items()}
