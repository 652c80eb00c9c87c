"""ESM-2's forward pass (Lin et al. 2023), fast and with fair-esm's numbers, for embeddings only.

Reads a fair-esm `ESM2` module's own weights unchanged and computes what
`model(tokens, repr_layers=...)["representations"]` computes, except that: attention runs through
`scaled_dot_product_attention` (flash / memory-efficient kernels on GPU, the fused flash kernel on
CPU) instead of materialising the score matrix; rotary embeddings are computed in fp32 whatever
the model's dtype; q, k and v come from one matmul; the residual is added inside the output
matmuls; and there is no LM head, no contact head and no work past the highest layer asked for.

The engine's one call is `embed_batch(model, tokens, repr_layers)`: it takes a padded (B, T) batch
as fair-esm's `BatchConverter` makes it and returns, per absolute layer, the rows of every real
token (BOS, residues, EOS) of all sequences concatenated, plus offsets: sequence i is rows
`offsets[i]:offsets[i + 1]`. On the CPU it runs packed (`esm2_packed_representations`): the
per-token work skips padding and attention runs one SDPA call per sequence, which on the CPU is as
fast as one padded call (PyTorch's jagged nested tensors and compiled FlexAttention document
masks both measured slower there). Elsewhere it runs padded (`esm2_representations`) with a
key-padding mask: one attention kernel launch per sequence would leave a GPU idle.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from esm.model.esm2 import ESM2
from esm.modules import TransformerLayer
from esm.multihead_attention import MultiheadAttention

# ESM-2 was trained masking 15% of tokens, 80% of those with <mask>; fair-esm rescales embeddings
# by the observed mask ratio against that, also at inference and also when nothing is masked.
MASK_RATIO_TRAIN = 0.15 * 0.8

Attend = Callable[[torch.Tensor], torch.Tensor]


def embed_batch(
    model: ESM2, tokens: torch.Tensor, repr_layers: Iterable[int], packed: bool | None = None
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """({absolute layer: (real tokens, D)}, offsets (B + 1,)) for a padded (B, T) token batch.

    `packed` defaults to True on the CPU and False elsewhere."""
    real = tokens.ne(model.padding_idx)
    offsets = F.pad(real.sum(1).cumsum(0), (1, 0))
    if packed is None:
        packed = tokens.device.type == "cpu"
    if packed:
        return esm2_packed_representations(model, tokens[real], offsets, repr_layers), offsets
    padded = esm2_representations(model, tokens, repr_layers)
    return {layer: rows[real] for layer, rows in padded.items()}, offsets


def esm2_representations(model: ESM2, tokens: torch.Tensor, repr_layers: Iterable[int]) -> dict[int, torch.Tensor]:
    """Same result as model(tokens, repr_layers=...)['representations']: (B, T, D) per absolute layer;
    layer 0 is the embeddings after token-dropout scaling and padding zeroing, and the last layer has
    emb_layer_norm_after applied."""
    layers = _check_layers(model, repr_layers)
    batch, length = tokens.shape
    real = tokens.ne(model.padding_idx)
    masked = (tokens == model.mask_idx).sum(1)[:, None, None]
    x = _embed(model, tokens, masked, real.sum(1)[:, None, None]) * real.unsqueeze(-1)
    # SDPA's boolean mask marks the keys to attend to; without padding the unmasked kernels are faster.
    attn_mask = real[:, None, None, :] if not real.all() else None
    cos, sin = _rotary_tables(model, torch.arange(length, device=tokens.device))
    heads = model.attention_heads

    def attend(qkv: torch.Tensor) -> torch.Tensor:
        qk, v = qkv.view(batch, length, 3 * heads, -1).split((2 * heads, heads), dim=2)
        q, k = _rotate(qk, cos, sin).to(qkv.dtype).transpose(1, 2).split(heads, dim=1)
        context = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=attn_mask)
        return context.transpose(1, 2).reshape(batch * length, -1)

    out = _encode(model, x.view(batch * length, -1), layers, attend)
    return {layer: rows.view(batch, length, -1) for layer, rows in out.items()}


def esm2_packed_representations(
    model: ESM2, tokens: torch.Tensor, cu_seqlens: torch.Tensor, repr_layers: Iterable[int]
) -> dict[int, torch.Tensor]:
    """esm2_representations for sequences concatenated without padding: `tokens` (N,) holds each
    sequence's BOS ... EOS in turn, sequence i at `cu_seqlens[i]:cu_seqlens[i + 1]`. Returns (N, D)
    per absolute layer."""
    layers = _check_layers(model, repr_layers)
    lengths = cu_seqlens.diff()
    sequence = torch.repeat_interleave(lengths)
    masked = torch.bincount(sequence[tokens == model.mask_idx], minlength=lengths.numel())
    x = _embed(model, tokens, masked[sequence, None], lengths[sequence, None])
    positions = torch.arange(tokens.numel(), device=tokens.device) - cu_seqlens[sequence]
    cos, sin = _rotary_tables(model, positions)
    heads = model.attention_heads
    bounds = cu_seqlens.tolist()

    def attend(qkv: torch.Tensor) -> torch.Tensor:
        qk, v = qkv.view(qkv.shape[0], 3 * heads, -1).split((2 * heads, heads), dim=1)
        qk = _rotate(qk, cos, sin).to(qkv.dtype)
        context = torch.empty_like(v)
        for start, end in zip(bounds[:-1], bounds[1:]):
            q, k = qk[start:end].transpose(0, 1).unsqueeze(0).split(heads, dim=1)
            one = F.scaled_dot_product_attention(q, k, v[start:end].transpose(0, 1).unsqueeze(0))
            context[start:end] = one[0].transpose(0, 1)
        return context.view(qkv.shape[0], -1)

    return _encode(model, x, layers, attend)


def _check_layers(model: ESM2, repr_layers: Iterable[int]) -> set[int]:
    layers = set(repr_layers)
    if not layers or not all(0 <= layer <= model.num_layers for layer in layers):
        raise ValueError(f"repr_layers {sorted(layers)}: need absolute layers 0 to {model.num_layers}")
    return layers


def _embed(model: ESM2, tokens: torch.Tensor, masked: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Token embeddings with fair-esm's token-dropout scaling; `masked` and `lengths` count the <mask>
    and the non-padding tokens of each token's sequence, shaped to broadcast against the embeddings."""
    x = model.embed_tokens(tokens)
    if model.token_dropout:
        x = x.masked_fill((tokens == model.mask_idx).unsqueeze(-1), 0.0)
        mask_ratio = masked.to(x.dtype) / lengths
        x = x * (1 - MASK_RATIO_TRAIN) / (1 - mask_ratio)
    return x


def _rotary_tables(model: ESM2, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin of RoFormer's angles, (positions, 1, head_dim), to broadcast over heads.

    The inverse frequencies are recomputed as fair-esm's RotaryEmbedding computes them, because its
    buffer is rounded when the model is cast to 16 bits."""
    head_dim = model.embed_dim // model.attention_heads
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)[:, None, :]
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin in fp32, where rotate_half(x1, x2) = (-x2, x1)."""
    x = x.float()
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


def _encode(model: ESM2, x: torch.Tensor, layers: set[int], attend: Attend) -> dict[int, torch.Tensor]:
    """The layer stack on (tokens, D) rows, up to the highest layer asked for."""
    out = {0: x} if 0 in layers else {}
    for index in range(max(layers)):
        x = _transformer_layer(model.layers[index], x, attend)
        if index + 1 in layers:
            out[index + 1] = x
    if model.num_layers in layers:
        out[model.num_layers] = _layer_norm(model.emb_layer_norm_after, x)
    return out


def _transformer_layer(layer: TransformerLayer, x: torch.Tensor, attend: Attend) -> torch.Tensor:
    """fair-esm's pre-norm layer; `attend` maps q|k|v rows to attention context rows. fair-esm scales q
    before the rotation, SDPA scales the scores after it: the same head_dim ** -0.5."""
    weight, bias = _qkv_weights(layer.self_attn)
    qkv = F.linear(_layer_norm(layer.self_attn_layer_norm, x), weight, bias)
    x = _linear_residual(layer.self_attn.out_proj, attend(qkv), x)
    hidden = F.gelu(layer.fc1(_layer_norm(layer.final_layer_norm, x)))
    return _linear_residual(layer.fc2, hidden, x)


def _layer_norm(norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _linear_residual(linear: torch.nn.Linear, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + linear(x), with the residual accumulated by the matmul itself."""
    return (residual + linear.bias).addmm_(x, linear.weight.t())


def _qkv_weights(attn: MultiheadAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k and v projections stacked for one matmul (a copy per call: small next to a batch's work,
    and never stale after the model's weights change)."""
    sources = (attn.q_proj, attn.k_proj, attn.v_proj)
    return torch.cat([p.weight for p in sources]), torch.cat([p.bias for p in sources])
