"""Pooling a forward pass's representations into the stored outputs, on the device.

`mean`: mean over each protein's kept residues; `bos`: the BOS token of its first window;
`per_tok`: its kept residues, proteins concatenated in batch order. Representations are padded
(windows, tokens, width) with the BOS token at position 0 and residues from position 1.
"""

from __future__ import annotations

import numpy as np
import torch

from extract.long_sequences import BatchLayout

OUTPUTS = ("mean", "bos", "per_tok")


def dataset_name(output: str, layer: int) -> str:
    return f"{output}/layer_{layer}"


def pool(representations: dict[int, torch.Tensor], layout: BatchLayout, outputs: list[str]) -> dict[str, np.ndarray]:
    """{dataset name: float32 array}: (proteins, width) for mean and bos, (kept residues, width) for per_tok."""
    any_layer = next(iter(representations.values()))
    device = any_layer.device
    kept = _kept_token_mask(layout, any_layer.shape[1], device)
    pooled = {}
    for layer, reps in representations.items():
        if "mean" in outputs:
            pooled[dataset_name("mean", layer)] = _mean(reps, kept, layout)
        if "bos" in outputs:
            pooled[dataset_name("bos", layer)] = reps[torch.as_tensor(layout.first_window, device=device), 0]
        if "per_tok" in outputs:
            # Windows are in protein order, so the kept tokens in row-major order are the residues in order.
            pooled[dataset_name("per_tok", layer)] = reps[kept]
    return {name: values.float().cpu().numpy() for name, values in pooled.items()}


def _kept_token_mask(layout: BatchLayout, tokens: int, device: torch.device) -> torch.Tensor:
    """(windows, tokens) bool: the tokens whose residue the layout keeps (offset 1 for BOS)."""
    positions = torch.arange(tokens, device=device)
    keep_start = torch.as_tensor(layout.keep_start + 1, device=device).unsqueeze(1)
    keep_stop = torch.as_tensor(layout.keep_stop + 1, device=device).unsqueeze(1)
    return (positions >= keep_start) & (positions < keep_stop)


def _mean(reps: torch.Tensor, kept: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
    """Sums per window, then per protein over its windows (placed side by side, not scatter-added, which
    is not deterministic on GPUs), divided by the protein's kept residues."""
    window_sums = (reps.float() * kept.unsqueeze(-1)).sum(1)
    rank_in_protein = np.arange(len(layout.protein)) - layout.first_window[layout.protein]
    side_by_side = window_sums.new_zeros(len(layout.embedded), int(rank_in_protein.max()) + 1, window_sums.shape[1])
    side_by_side[torch.as_tensor(layout.protein, device=reps.device),
                 torch.as_tensor(rank_in_protein, device=reps.device)] = window_sums
    counts = torch.as_tensor(layout.embedded, dtype=torch.float32, device=reps.device).unsqueeze(1)
    return side_by_side.sum(1) / counts
