"""How many tokens a batch of ESM-2 may hold: fair-esm's on the CPU, sized from free memory on a GPU."""

from __future__ import annotations

import torch

CPU_TOKEN_BUDGET = 4096
MAX_TOKEN_BUDGET = 1 << 17


def memory_token_budget(free_bytes: int, dtype: torch.dtype, embed_dim: int, layers_kept: int, heads: int,
                        scores_per_token: int) -> int:
    """Tokens whose forward fits in half of `free_bytes` (the rest is headroom: the allocator's
    fragmentation, pooling's copies), at least the seed plan's 2048 (fp32) / 3072 (16-bit), at most
    MAX_TOKEN_BUDGET (batches big enough to fill the device, small enough to keep ranks balanced).

    Per token, in the compute dtype: 20 rows of `embed_dim` for the 16 that live at a layer's peak
    (residual, norm, q, k, v and their rotated copies, context, the 4x MLP hidden, which its GELU
    overwrites) plus one per layer kept for the outputs; in fp32: q and k rotated, and the kept residues
    summed for the means.
    `scores_per_token` counts the attention scores a forward materialises per token and head (fair-esm's:
    the window; none for SDPA's kernels), held in fp32 with their softmax."""
    element = torch.finfo(dtype).bits // 8
    per_token = embed_dim * (element * (20 + layers_kept) + 4 * 3) + 2 * 4 * heads * scores_per_token
    floor = 2048 if dtype == torch.float32 else 3072
    return int(max(floor, min(MAX_TOKEN_BUDGET, free_bytes // 2 // per_token)))
