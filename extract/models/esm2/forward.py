"""ESM-2's forward pass (Lin et al. 2023), fast and with fair-esm's numbers, for embeddings only.

Reads a fair-esm `ESM2` module's own weights unchanged and computes what
`model(tokens, repr_layers=...)["representations"]` computes, except that: attention runs through
`scaled_dot_product_attention` (flash / memory-efficient kernels on GPU, the fused flash kernel on
CPU) instead of materialising the score matrix; rotary embeddings are computed in fp32 whatever
the model's dtype; the residual is added inside the output matmuls; and there is no LM head, no
contact head and no work past the highest layer asked for.

The embedder's one call is `embed_batch(model, tokens, repr_layers)`: it takes a padded (B, T) batch
on the host, as fair-esm's `BatchConverter` makes it, and returns, per absolute layer, the rows of
every real token (BOS, residues, EOS) of all sequences concatenated on the model's device, plus host
offsets: sequence i is rows `offsets[i]:offsets[i + 1]`. No compute is spent on padding: the
sequences are packed on the host and attention runs per sequence, either one SDPA call per sequence
(`PER_SEQUENCE`, the CPU default: as fast there as one padded call, while PyTorch's jagged nested
tensors and compiled FlexAttention document masks both measured slower) or one SDPA call on a jagged
nested tensor (`JAGGED`, the CUDA default: PyTorch runs FlashAttention's or the memory-efficient
kernel's variable-length form on it). Other devices run padded batches with a key-padding mask
(`PADDED`, `esm2_representations`).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from esm.model.esm2 import ESM2
from esm.modules import TransformerLayer

from extract.runtime.device import to_device

# ESM-2 was trained masking 15% of tokens, 80% of those with <mask>; fair-esm rescales embeddings
# by the observed mask ratio against that, also at inference and also when nothing is masked.
MASK_RATIO_TRAIN = 0.15 * 0.8

PER_SEQUENCE, JAGGED, PADDED = "per_sequence", "jagged", "padded"
# CUDA's flash and memory-efficient kernels put the sequences of a call on a grid axis of at most 65535.
SEQUENCES_PER_JAGGED_CALL = 65535
PACKINGS = (PER_SEQUENCE, JAGGED, PADDED)

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # q, k, v rows -> context rows

# Building a jagged nested tensor makes torch log a notice about its own internals (torch.fx's
# is_fx_tracing), once per process; it says nothing to our users.
logging.getLogger("torch.fx._symbolic_trace").addFilter(lambda record: "is_fx_tracing" not in record.getMessage())


def default_packing(device: torch.device) -> str:
    return {"cpu": PER_SEQUENCE, "cuda": JAGGED}.get(device.type, PADDED)


def embed_batch(
    model: ESM2, tokens: torch.Tensor, repr_layers: Iterable[int], packing: str | None = None
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """({absolute layer: (real tokens, D) on the model's device}, host offsets (B + 1,)) for a padded
    (B, T) host token batch; `packing` defaults to `default_packing(the model's device)`."""
    device = model.embed_tokens.weight.device
    real = tokens.ne(model.padding_idx)
    offsets = cumulative_offsets(real.sum(1))
    packing = packing or default_packing(device)
    if packing == PADDED:
        padded = esm2_representations(model, to_device(tokens, device), repr_layers)
        return {layer: rows[real.to(device)] for layer, rows in padded.items()}, offsets
    packed = to_device(tokens[real], device)
    return esm2_packed_representations(model, packed, offsets, repr_layers, packing), offsets


def cumulative_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """(n + 1,) offsets of n consecutive runs of rows of these lengths."""
    return F.pad(lengths.cumsum(0), (1, 0))


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
    cos, sin = rotary_tables(model, torch.arange(length, device=tokens.device))
    heads = model.attention_heads

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (rows.view(batch, length, heads, -1) for rows in (q, k, v))
        q, k = (rotate(rows, cos, sin).to(v.dtype) for rows in (q, k))
        context = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=attn_mask)
        return context.transpose(1, 2).reshape(batch * length, -1)

    out = _encode(model, x.view(batch * length, -1), layers, attend)
    return {layer: rows.view(batch, length, -1) for layer, rows in out.items()}


def esm2_packed_representations(
    model: ESM2, tokens: torch.Tensor, cu_seqlens: torch.Tensor, repr_layers: Iterable[int],
    packing: str = PER_SEQUENCE,
) -> dict[int, torch.Tensor]:
    """esm2_representations for sequences concatenated without padding: `tokens` (N,) holds each
    sequence's BOS ... EOS in turn, sequence i at `cu_seqlens[i]:cu_seqlens[i + 1]` (a host tensor, so
    that nothing here waits for the device). Returns (N, D) per absolute layer."""
    layers = _check_layers(model, repr_layers)
    device = tokens.device
    host_sequence = torch.repeat_interleave(cu_seqlens.diff())
    sequence, bounds = to_device(host_sequence, device), to_device(cu_seqlens, device)
    masked_so_far = F.pad((tokens == model.mask_idx).cumsum(0), (1, 0))
    masked = masked_so_far[bounds[1:]] - masked_so_far[bounds[:-1]]
    x = _embed(model, tokens, masked[sequence, None], bounds.diff()[sequence, None])
    cos, sin = rotary_tables(model, to_device(torch.arange(tokens.numel()) - cu_seqlens[host_sequence], device))
    heads = model.attention_heads
    varlen_attention = _jagged_attention(cu_seqlens, bounds) if packing == JAGGED else \
        _per_sequence_attention(cu_seqlens.tolist())

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (rows.view(rows.shape[0], heads, -1) for rows in (q, k, v))
        q, k = (rotate(rows, cos, sin).to(v.dtype) for rows in (q, k))
        return varlen_attention(q, k, v).reshape(v.shape[0], -1)

    return _encode(model, x, layers, attend)


VarlenAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _per_sequence_attention(bounds: list[int]) -> VarlenAttention:
    """Attention of packed (N, heads, head_dim) q, k, v, one SDPA call per sequence."""

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        context = torch.empty_like(v)
        for start, end in zip(bounds[:-1], bounds[1:]):
            one = F.scaled_dot_product_attention(*(x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v)))
            context[start:end] = one[0].transpose(0, 1)
        return context

    return attention


def _jagged_attention(cu_seqlens: torch.Tensor, offsets: torch.Tensor) -> VarlenAttention:
    """Attention of packed (N, heads, head_dim) q, k, v: one SDPA call on jagged nested tensors per
    SEQUENCES_PER_JAGGED_CALL sequences; `offsets` is `cu_seqlens` on their device."""
    sequences, calls = len(cu_seqlens) - 1, []
    for first in range(0, sequences, SEQUENCES_PER_JAGGED_CALL):
        last = min(first + SEQUENCES_PER_JAGGED_CALL, sequences)
        start, end = int(cu_seqlens[first]), int(cu_seqlens[last])
        calls.append((start, end, _jagged_layout(cu_seqlens[first : last + 1], offsets[first : last + 1] - start)))

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        context = [F.scaled_dot_product_attention(*(jagged(x[start:end]) for x in (q, k, v))).transpose(1, 2).values()
                   for start, end, jagged in calls]
        return context[0] if len(context) == 1 else torch.cat(context)

    return attention


def _jagged_layout(cu_seqlens: torch.Tensor, offsets: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Makes the packed (n, heads, head_dim) rows of these sequences a (sequences, heads, jagged length,
    head_dim) nested tensor. `offsets`: where each sequence starts in the rows, on their device (one tensor
    for q, k and v: it names their common jagged dimension); the length bounds come from the host
    `cu_seqlens`, so that nothing waits for the device."""
    lengths = cu_seqlens.diff()
    shortest, longest = int(lengths.min()), int(lengths.max())

    def jagged(x: torch.Tensor) -> torch.Tensor:
        return torch.nested.nested_tensor_from_jagged(x.contiguous(), offsets, min_seqlen=shortest,
                                                      max_seqlen=longest).transpose(1, 2)

    return jagged


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


def rotary_tables(model: ESM2, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin of RoFormer's angles, (positions, 1, head_dim), to broadcast over heads.

    The inverse frequencies are recomputed as fair-esm's RotaryEmbedding computes them, because its
    buffer is rounded when the model is cast to 16 bits."""
    head_dim = model.embed_dim // model.attention_heads
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)[:, None, :]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
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
    """fair-esm's pre-norm layer; `attend` maps q, k and v rows to attention context rows. fair-esm scales q
    before the rotation, SDPA scales the scores after it: the same head_dim ** -0.5. (One matmul of the
    three projections stacked measured no faster, and stacking them costs a copy of their weights.)"""
    attention = layer.self_attn
    normed = _layer_norm(layer.self_attn_layer_norm, x)
    q, k, v = (F.linear(normed, p.weight, p.bias) for p in (attention.q_proj, attention.k_proj, attention.v_proj))
    x = _linear_residual(attention.out_proj, attend(q, k, v), x)
    hidden = F.gelu(layer.fc1(_layer_norm(layer.final_layer_norm, x)))
    return _linear_residual(layer.fc2, hidden, x)


def _layer_norm(norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _linear_residual(linear: torch.nn.Linear, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + linear(x), with the residual accumulated by the matmul itself."""
    return (residual + linear.bias).addmm_(x, linear.weight.t())
