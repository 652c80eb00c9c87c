"""ESM-2's forward pass (Lin et al. 2023), fast and with fair-esm's numbers, for embeddings only.

Reads a fair-esm `ESM2` module's own weights unchanged and computes what
`model(tokens, repr_layers=...)["representations"]` computes for every real token, except that: attention
runs through `scaled_dot_product_attention` (flash / memory-efficient kernels on GPU, the fused flash
kernel on CPU) instead of materialising the score matrix; rotary embeddings are computed in fp32 whatever
the model's dtype; the residual is added inside the output matmuls; every layer's feed-forward writes its
activations, GELU included, into one buffer per batch; and there is no LM head, no contact head and no
work past the highest layer asked for.

One layer stack runs on a packed batch (each window's tokens in turn, no padding: `tokens.PackedTokens`),
so no compute is spent on padding; token dropout, the rotary tables and the final norm exist once. The
attention is the one swappable part:
- `PADDED`, the default for bf16 and fp16 on CPUs without AMX and on other devices: the sequences padded
  into one SDPA call with a key-padding mask (the planner sorts by length, so a batch's sequences are
  nearly equally long and the padding is small);
- `PER_SEQUENCE`, the default for fp32 on every CPU and for bf16 and fp16 on CPUs with AMX: one SDPA call
  per sequence, in bf16 and fp16 its keys padded to a multiple of `KEYS_MULTIPLE` and masked (which of
  the two is faster depends on the CPU and the dtype: docs/benchmarks.md);
- `JAGGED`, the CUDA default: one SDPA call on a jagged nested tensor (PyTorch runs FlashAttention's or
  the memory-efficient kernel's variable-length form on it);
- `CHUNKED`, the low-memory retry: per sequence, `ATTENTION_CHUNK` queries at a time.
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from esm.model.esm2 import ESM2
from esm.modules import TransformerLayer

from extract.models.esm2.tokens import PackedTokens
from extract.runtime.device import cpu_capabilities, has_bf16_matrix_units, to_device

# ESM-2 was trained masking 15% of tokens, 80% of those with <mask>; fair-esm rescales embeddings
# by the observed mask ratio against that, also at inference and also when nothing is masked.
MASK_RATIO_TRAIN = 0.15 * 0.8

PER_SEQUENCE, JAGGED, PADDED, CHUNKED = "per_sequence", "jagged", "padded", "chunked"
ATTENTIONS = (PER_SEQUENCE, JAGGED, PADDED, CHUNKED)
# CUDA's flash and memory-efficient kernels put the sequences of a call on a grid axis of at most 65535.
SEQUENCES_PER_JAGGED_CALL = 65535
ATTENTION_CHUNK = 128  # queries per SDPA call of the chunked attention
# In bf16 and fp16, torch's CPU flash-attention kernel takes its packed AMX path only when the key count
# is a multiple of 16, 1.2 to 1.6 times as fast (docs/benchmarks.md): PER_SEQUENCE pads each sequence's
# keys to one there. In fp32 the padding only costs.
KEYS_MULTIPLE = 16

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # q, k, v rows -> context rows

# oneDNN, which runs the CPU's 16-bit matmuls, builds its kernels anew for every new number of rows, and
# nearly every batch of a job would bring one: there the layer stack also runs zero rows that fill the
# batch up to a multiple of this many (a few counts in all), left out of the attention and of the result.
CPU_ROWS_MULTIPLE = 64

# Building a jagged nested tensor makes torch log a notice about its own internals (torch.fx's
# is_fx_tracing), once per process; it says nothing to our users.
logging.getLogger("torch.fx._symbolic_trace").addFilter(lambda record: "is_fx_tracing" not in record.getMessage())


def default_attention(device: torch.device, dtype: torch.dtype,
                      capabilities: Mapping[str, object] | None = None) -> str:
    """JAGGED on CUDA. On the CPU the faster form on each kind of CPU measured (docs/benchmarks.md):
    PER_SEQUENCE in fp32, and in 16 bits where the CPU has bf16 matrix units (AMX); PADDED elsewhere.
    `capabilities` default to what `cpu_capabilities()` reads."""
    if device.type == "cuda":
        return JAGGED
    if device.type == "cpu":
        if dtype == torch.float32:
            return PER_SEQUENCE
        capabilities = capabilities if capabilities is not None else cpu_capabilities()[0]
        if capabilities and has_bf16_matrix_units(capabilities):
            return PER_SEQUENCE
    return PADDED


@torch.no_grad()
def embed_batch(model: ESM2, batch: PackedTokens, repr_layers: Iterable[int],
                attention: str | None = None) -> dict[int, torch.Tensor]:
    """{absolute layer: (tokens, D) rows on the model's device} for a packed host batch: window i's rows
    are `batch.offsets[i]:batch.offsets[i + 1]`. Layer 0 is the embeddings after token-dropout scaling, and
    the last layer has emb_layer_norm_after applied. `attention` defaults to `default_attention`'s choice."""
    layers = _check_layers(model, repr_layers)
    device = model.embed_tokens.weight.device
    tokens, cu_seqlens = to_device(batch.tokens, device), batch.offsets
    host_sequence = torch.repeat_interleave(batch.lengths)
    sequence, bounds = to_device(host_sequence, device), to_device(cu_seqlens, device)
    masked_so_far = F.pad((tokens == model.mask_idx).cumsum(0), (1, 0))
    masked = masked_so_far[bounds[1:]] - masked_so_far[bounds[:-1]]
    x = _embed(model, tokens, masked[sequence, None], bounds.diff()[sequence, None])
    positions = to_device(torch.arange(tokens.numel()) - cu_seqlens[host_sequence], device)
    cos, sin = rotary_tables(model, positions)
    heads, real = model.attention_heads, len(tokens)
    cpu_reduced_precision = device.type == "cpu" and x.dtype != torch.float32
    varlen_attention = _varlen_attention(attention or default_attention(device, x.dtype), cu_seqlens, bounds,
                                         sequence, positions, KEYS_MULTIPLE if cpu_reduced_precision else 1)
    filler = -real % CPU_ROWS_MULTIPLE if cpu_reduced_precision else 0

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (rows[:real].view(real, heads, -1) for rows in (q, k, v))
        q, k = (rotate(rows, cos, sin).to(v.dtype) for rows in (q, k))
        return _filled(varlen_attention(q, k, v).reshape(real, -1), filler)

    rows = _encode(model, _filled(x, filler), layers, attend)
    return {layer: values[:real] for layer, values in rows.items()}


def _filled(rows: torch.Tensor, filler: int) -> torch.Tensor:
    """`rows` and `filler` zero rows after them."""
    return F.pad(rows, (0, 0, 0, filler)) if filler else rows


VarlenAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _varlen_attention(attention: str, cu_seqlens: torch.Tensor, offsets: torch.Tensor, sequence: torch.Tensor,
                      positions: torch.Tensor, keys_multiple: int) -> VarlenAttention:
    """Attention of packed (N, heads, head_dim) q, k, v, each token attending to its own sequence's tokens:
    `cu_seqlens` the sequences' bounds on the host, `offsets` the same on the device, `sequence` and
    `positions` each token's sequence and position in it, on the device; PER_SEQUENCE pads each
    sequence's keys to a multiple of `keys_multiple`."""
    if attention == PER_SEQUENCE and keys_multiple > 1:
        return _aligned_per_sequence_attention(cu_seqlens, keys_multiple)
    if attention == PER_SEQUENCE:
        return _per_sequence_attention(cu_seqlens.tolist())
    if attention == CHUNKED:
        return _per_sequence_attention(cu_seqlens.tolist(), ATTENTION_CHUNK)
    if attention == JAGGED:
        return _jagged_attention(cu_seqlens, offsets)
    if attention == PADDED:
        return _padded_attention(cu_seqlens.diff(), sequence, positions)
    raise ValueError(f"attention {attention!r}: one of {', '.join(ATTENTIONS)}")


def _per_sequence_attention(bounds: list[int], queries_per_call: int | None = None) -> VarlenAttention:
    """One SDPA call per sequence, or per block of `queries_per_call` of its queries."""

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        context = torch.empty_like(v)
        for start, end in zip(bounds[:-1], bounds[1:]):
            keys, values = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (k, v))
            step = queries_per_call or end - start
            for first in range(start, end, step):
                last = min(first + step, end)
                one = F.scaled_dot_product_attention(q[first:last].transpose(0, 1).unsqueeze(0), keys, values)
                context[first:last] = one[0].transpose(0, 1)
        return context

    return attention


def _aligned_per_sequence_attention(cu_seqlens: torch.Tensor, keys_multiple: int) -> VarlenAttention:
    """One SDPA call per sequence, each padded to a multiple of `keys_multiple` rows with its padding keys
    masked: the same context, and torch's CPU flash kernel runs its AMX path on such key counts (CPU
    only). The padded copies of q, k and v are made at the first layer, zero in the padding, and
    refilled by each."""
    bounds, lengths = cu_seqlens.tolist(), cu_seqlens.diff()
    padded_lengths = (-(-lengths // keys_multiple) * keys_multiple).tolist()
    padded_starts = [0, *itertools.accumulate(padded_lengths)]
    calls = [(start, end, padded_start, padded_start + padded, _real_keys_mask(lengths[i : i + 1], padded))
             for i, (start, end, padded_start, padded) in
             enumerate(zip(bounds[:-1], bounds[1:], padded_starts, padded_lengths))]
    padded_copies: list[torch.Tensor] = []

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not padded_copies:
            padded_copies.extend(q.new_zeros((padded_starts[-1], *q.shape[1:])) for _ in range(3))
        context = torch.empty_like(v)
        for start, end, padded_start, padded_end, mask in calls:
            rows = [copy[padded_start:padded_end] for copy in padded_copies]
            for padded, packed in zip(rows, (q, k, v)):
                padded[: end - start] = packed[start:end]
            one = F.scaled_dot_product_attention(*(x.transpose(0, 1).unsqueeze(0) for x in rows), attn_mask=mask)
            context[start:end] = one[0, :, : end - start].transpose(0, 1)
        return context

    return attention


def _real_keys_mask(lengths: torch.Tensor, keys: int) -> torch.Tensor | None:
    """SDPA's (sequences, 1, 1, keys) host mask of each sequence's first `lengths` keys, the real ones;
    None when all are real (the unmasked kernels are faster)."""
    real = torch.arange(keys)[None, :] < lengths[:, None]
    return None if real.all() else real[:, None, None, :]


def _padded_attention(lengths: torch.Tensor, sequence: torch.Tensor, positions: torch.Tensor) -> VarlenAttention:
    """One SDPA call on the sequences padded to the longest, with a mask of the real keys (none when all
    are as long)."""
    batch, longest = len(lengths), int(lengths.max())
    padded_row = sequence * longest + positions
    key_mask = _real_keys_mask(lengths, longest)
    key_mask = key_mask if key_mask is None else to_device(key_mask, sequence.device)

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (x.new_zeros((batch * longest, *x.shape[1:])).index_copy_(0, padded_row, x)
                   .view(batch, longest, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask).transpose(1, 2)
        return context.reshape(batch * longest, *context.shape[-2:]).index_select(0, padded_row)

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
    hidden = x.new_empty(len(x), model.layers[0].fc1.out_features)
    for index in range(max(layers)):
        x = _transformer_layer(model.layers[index], x, attend, hidden)
        if index + 1 in layers:
            out[index + 1] = x
    if model.num_layers in layers:
        out[model.num_layers] = _layer_norm(model.emb_layer_norm_after, x)
    return out


def _transformer_layer(layer: TransformerLayer, x: torch.Tensor, attend: Attend, hidden: torch.Tensor) -> torch.Tensor:
    """fair-esm's pre-norm layer; `attend` maps q, k and v rows to attention context rows. fair-esm scales q
    before the rotation, SDPA scales the scores after it: the same head_dim ** -0.5. The three projections stay
    apart: stacking them would copy their weights. The feed-forward's (tokens, ffn) activations, the largest
    tensors of the layer, go into `hidden`, one buffer for all the layers of a batch: on the CPU a new one
    per layer costs the page faults of fresh memory (docs/benchmarks.md has the measurements)."""
    attention = layer.self_attn
    normed = _layer_norm(layer.self_attn_layer_norm, x)
    q, k, v = (F.linear(normed, p.weight, p.bias) for p in (attention.q_proj, attention.k_proj, attention.v_proj))
    x = _linear_residual(attention.out_proj, attend(q, k, v), x)
    torch.addmm(layer.fc1.bias, _layer_norm(layer.final_layer_norm, x), layer.fc1.weight.t(), out=hidden)
    return _linear_residual(layer.fc2, torch.ops.aten.gelu_(hidden), x)


def _layer_norm(norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _linear_residual(linear: torch.nn.Linear, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + linear(x), with the residual accumulated by the matmul itself."""
    return (residual + linear.bias).addmm_(x, linear.weight.t())
