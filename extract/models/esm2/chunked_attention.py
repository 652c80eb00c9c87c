"""ESM-2's forward pass for one sequence, with attention computed a block of queries at a time.

The last resort for a sequence that runs out of device memory even alone: fair-esm's forward holds every
head's full length x length attention matrix (and their mean over heads) at once; here only
`chunk` x length scores per head exist at a time. Same weights, same operations in the same order per
query (scaled query, rotary embeddings, softmax in fp32), so the representations equal fair-esm's. As in
the fast forward, the rotary embeddings are computed in fp32 whatever the model's dtype (fair-esm's own
rotate 16-bit positions in 16 bits, which merges neighbouring positions past 256).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from esm.model.esm2 import ESM2
from esm.modules import gelu
from esm.multihead_attention import MultiheadAttention

from extract.models.esm2.forward import MASK_RATIO_TRAIN, rotary_tables, rotate

ATTENTION_CHUNK = 128  # queries per block of attention scores


def chunked_forward(model: ESM2, tokens: torch.Tensor, repr_layers: list[int],
                    chunk: int = ATTENTION_CHUNK) -> dict[int, torch.Tensor]:
    """fair-esm's `model(tokens, repr_layers)["representations"]` for a (1, T) batch without padding."""
    if tokens.shape[0] != 1:
        raise ValueError("chunked_forward computes one sequence at a time")
    x = model.embed_scale * model.embed_tokens(tokens)
    if model.token_dropout:
        masked = tokens == model.mask_idx
        x.masked_fill_(masked.unsqueeze(-1), 0.0)
        mask_ratio_observed = masked.sum(-1).to(x.dtype) / tokens.shape[1]
        x = x * (1 - MASK_RATIO_TRAIN) / (1 - mask_ratio_observed)[:, None, None]
    representations = {0: x} if 0 in repr_layers else {}
    x = x.transpose(0, 1)  # (B, T, E) -> (T, B, E), fair-esm's layer layout
    cos, sin = (table.squeeze(1) for table in rotary_tables(model, torch.arange(tokens.shape[1], device=x.device)))
    for number, layer in enumerate(model.layers, 1):
        x = x + _chunked_self_attention(layer.self_attn, layer.self_attn_layer_norm(x), cos, sin, chunk)
        x = x + layer.fc2(gelu(layer.fc1(layer.final_layer_norm(x))))
        if number in repr_layers:
            representations[number] = x.transpose(0, 1)
    if model.num_layers in repr_layers:  # the last layer's representation is taken after the final norm
        representations[model.num_layers] = model.emb_layer_norm_after(x).transpose(0, 1)
    return representations


def _chunked_self_attention(attn: MultiheadAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            chunk: int) -> torch.Tensor:
    length, batch, embed_dim = x.shape
    heads = batch * attn.num_heads

    def by_head(projected: torch.Tensor) -> torch.Tensor:  # (T, B, E) -> (B * H, T, head_dim)
        return projected.contiguous().view(length, heads, attn.head_dim).transpose(0, 1)

    q = by_head(attn.q_proj(x) * attn.scaling)
    k = by_head(attn.k_proj(x))
    v = by_head(attn.v_proj(x))
    q, k = (rotate(rows, cos, sin).to(v.dtype) for rows in (q, k))
    out = torch.empty_like(q)
    for start in range(0, length, chunk):
        scores = torch.bmm(q[:, start:start + chunk], k.transpose(1, 2))
        probabilities = F.softmax(scores, dim=-1, dtype=torch.float32).type_as(scores)
        out[:, start:start + chunk] = torch.bmm(probabilities, v)
    return attn.out_proj(out.transpose(0, 1).contiguous().view(length, batch, embed_dim))
