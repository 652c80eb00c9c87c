"""The fast ESM-2 forward against fair-esm's own forward, on the same weights."""

import copy
import random

import pytest
import torch
from esm.data import BatchConverter

from extract.models.esm2 import forward as esm2_forward
from extract.models.esm2.forward import (ATTENTIONS, CHUNKED, JAGGED, PADDED, PER_SEQUENCE, default_attention,
                                         embed_batch)
from extract.models.esm2.checkpoints import build_random_esm2, load_model
from extract.models.esm2.tokens import pack
from fair_esm_reference import fair_esm_means
from jobs import AMINO_ACIDS, phage_sample


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    loaded = load_model(str(tiny_model_path))
    return loaded.model.eval(), loaded.alphabet


def _mixed_sequences():
    """Mixed lengths, two past the 1022-residue window, one with <mask> tokens (token-dropout scaling)."""
    rng = random.Random(4)
    seqs = ["".join(rng.choices(AMINO_ACIDS, k=n)) for n in (1500, 1100, 400, 37, 5, 1)]
    seqs.append("MKT<mask>AYIAK<mask>QRQISFVK" + "".join(rng.choices(AMINO_ACIDS, k=60)))
    return seqs


def _mixed_batch(alphabet):
    """fair-esm's padded tokens of the mixed sequences, as its BatchConverter makes them."""
    _, _, tokens = BatchConverter(alphabet, 1022)([(str(i), s) for i, s in enumerate(_mixed_sequences())])
    return tokens


def _packed(alphabet, sequences=None, truncation=1022):
    return pack(alphabet, _mixed_sequences() if sequences is None else sequences, truncation)


@pytest.mark.parametrize("truncation", [1022, 30])
def test_packed_tokens_are_fair_esms_batch_converter_tokens_without_the_padding(tiny, truncation):
    _, alphabet = tiny
    seqs = _mixed_sequences()
    _, _, expected = BatchConverter(alphabet, truncation)([(str(i), s) for i, s in enumerate(seqs)])
    batch = _packed(alphabet, seqs, truncation)
    real = expected.ne(alphabet.padding_idx)
    assert batch.offsets.tolist() == [0, *real.sum(1).cumsum(0).tolist()]
    assert torch.equal(batch.tokens, expected[real])
    assert torch.equal(batch.padded(alphabet.padding_idx), expected)
    assert batch.tokens[batch.offsets[:-1]].eq(alphabet.cls_idx).all()
    assert batch.tokens[batch.offsets[1:] - 1].eq(alphabet.eos_idx).all()


def _fair_esm(model, tokens, layers):
    with torch.inference_mode():
        return model(tokens, repr_layers=layers)["representations"]


def test_padded_attention_matches_fair_esm(tiny):
    model, alphabet = tiny
    tokens = _mixed_batch(alphabet)
    real = tokens.ne(alphabet.padding_idx)
    expected = _fair_esm(model, tokens, [0, 1, 2])
    with torch.inference_mode():
        ours = embed_batch(model, _packed(alphabet), [0, 1, 2], PADDED)
    assert tokens.shape[1] == 1024 and not real.all()
    assert sorted(ours) == [0, 1, 2]
    for layer in (0, 1, 2):
        assert ours[layer].shape == expected[layer][real].shape
        assert (ours[layer] - expected[layer][real]).abs().max() <= 1e-4


def test_batch_without_padding_matches_fair_esm(tiny):
    model, alphabet = tiny
    tokens = _mixed_batch(alphabet)[:2]
    assert tokens.ne(alphabet.padding_idx).all()
    expected = _fair_esm(model, tokens, [2])
    with torch.inference_mode():
        ours = embed_batch(model, _packed(alphabet, _mixed_sequences()[:2]), [2], PADDED)
    assert (ours[2] - expected[2].flatten(0, 1)).abs().max() <= 1e-4


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_embed_batch_rows_match_fair_esm_per_sequence(tiny, attention):
    model, alphabet = tiny
    tokens = _mixed_batch(alphabet)
    real = tokens.ne(alphabet.padding_idx)
    expected = _fair_esm(model, tokens, [0, 1, 2])
    batch = _packed(alphabet)
    with torch.inference_mode():
        rows = embed_batch(model, batch, [0, 1, 2], attention)
    offsets = batch.offsets
    for layer in (0, 1, 2):
        assert rows[layer].shape == (int(real.sum()), model.embed_dim)
        for i in range(len(tokens)):
            ours = rows[layer][offsets[i] : offsets[i + 1]]
            assert (ours - expected[layer][i, real[i]]).abs().max() <= 1e-4


def test_chunked_attention_takes_queries_a_block_at_a_time(tiny, monkeypatch):
    """The low-memory attention: the 1024-token window's queries in 128-query calls, against all its keys."""
    model, alphabet = tiny
    batch = _packed(alphabet, _mixed_sequences()[:1])
    shapes = []

    def counted(q, k, v, **kwargs):
        shapes.append((q.shape[-2], k.shape[-2]))
        return sdpa(q, k, v, **kwargs)

    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(esm2_forward.F, "scaled_dot_product_attention", counted)
    with torch.inference_mode():
        embed_batch(model, batch, [1], CHUNKED)
    assert shapes == [(128, 1024)] * 8


# Each window's SDPA call: (keys, real keys where a mask hides padding ones), for layer 1.
PLAIN_CALLS = [(1024, None), (1024, None), (402, None), (39, None), (7, None), (3, None), (80, None)]
CALLS_OF_16 = [(1024, None), (1024, None), (416, 402), (48, 39), (16, 7), (16, 3), (80, None)]


@pytest.mark.parametrize("dtype, calls", [(torch.bfloat16, CALLS_OF_16), (torch.float32, PLAIN_CALLS)])
def test_per_sequence_attention_pads_keys_to_a_multiple_of_16_in_bf16_only(tiny, monkeypatch, dtype, calls):
    """torch's CPU flash kernel runs its AMX path in bf16 on key counts of a multiple of 16: there each
    sequence's call is padded to one, its padding keys masked (the rows' agreement with fair-esm is
    checked above and below); in fp32 the padding would only cost."""
    model, alphabet = tiny
    model = copy.deepcopy(model).to(dtype)
    seen = []

    def counted(q, k, v, attn_mask=None, **kwargs):
        seen.append((k.shape[-2], None if attn_mask is None else int(attn_mask.sum())))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(esm2_forward.F, "scaled_dot_product_attention", counted)
    with torch.inference_mode():
        embed_batch(model, _packed(alphabet), [1], PER_SEQUENCE)
    assert seen == calls


def test_jagged_calls_of_at_most_so_many_sequences_give_the_same_rows(tiny, monkeypatch):
    """CUDA's varlen kernels take at most 65535 sequences a call; a batch of more is split: here 7 into 3 + 3 + 1."""
    model, alphabet = tiny
    tokens = _mixed_batch(alphabet)
    batch = _packed(alphabet)
    offsets = batch.offsets
    calls = []

    def counted(*args, **kwargs):
        calls.append(len(args[0].offsets()) - 1)  # sequences in this call
        return sdpa(*args, **kwargs)

    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.inference_mode():
        whole = embed_batch(model, batch, [2], JAGGED)
        monkeypatch.setattr(esm2_forward, "SEQUENCES_PER_JAGGED_CALL", 3)
        monkeypatch.setattr(esm2_forward.F, "scaled_dot_product_attention", counted)
        split = embed_batch(model, batch, [2], JAGGED)
    assert calls == [3, 3, 1] * model.num_layers
    assert (split[2] - whole[2]).abs().max() <= 1e-6
    expected = _fair_esm(model, tokens, [2])[2]
    real = tokens.ne(alphabet.padding_idx)
    for i in range(len(tokens)):
        assert (split[2][offsets[i] : offsets[i + 1]] - expected[i, real[i]]).abs().max() <= 1e-4


def test_only_the_layers_asked_for_are_returned_and_computed(tiny):
    model, alphabet = tiny
    tokens = _mixed_batch(alphabet)
    real = tokens.ne(alphabet.padding_idx)
    expected = _fair_esm(model, tokens, [1])
    truncated = copy.deepcopy(model)
    truncated.layers[1] = torch.nn.Module()  # any use of the last layer would raise AttributeError
    batch = _packed(alphabet)
    with torch.inference_mode():
        for attention in ATTENTIONS:
            rows = embed_batch(truncated, batch, [1, 0], attention)
            assert sorted(rows) == [0, 1]
            assert (rows[1] - expected[1][real]).abs().max() <= 1e-4
        assert sorted(embed_batch(truncated, batch, [0])) == [0]


@pytest.mark.parametrize("layers", [[3], [-1], []])
def test_layers_the_model_does_not_have_are_refused(tiny, layers):
    model, alphabet = tiny
    with pytest.raises(ValueError, match="repr_layers"):
        embed_batch(model, _packed(alphabet), layers)


def test_the_default_cpu_attention_is_per_sequence_in_fp32_and_with_amx_and_padded_for_16_bits_without_amx():
    cpu, amx = torch.device("cpu"), {"amx_tile": True, "amx_bf16": True, "avx512_bf16": True}
    for dtype in (torch.bfloat16, torch.float16):
        assert default_attention(cpu, dtype, amx) == PER_SEQUENCE
        assert default_attention(cpu, dtype, {**amx, "amx_bf16": False}) == PADDED
        assert default_attention(cpu, dtype, {"amx_tile": False, "amx_bf16": False, "avx512_bf16": True}) == PADDED
        assert default_attention(cpu, dtype, {}) == PADDED
    for capabilities in (amx, {"amx_tile": False, "amx_bf16": False, "avx512_bf16": True}, {}):
        assert default_attention(cpu, torch.float32, capabilities) == PER_SEQUENCE
    for dtype in (torch.float32, torch.bfloat16):
        assert default_attention(torch.device("cuda"), dtype, amx) == JAGGED


def test_an_attention_that_does_not_exist_is_refused(tiny):
    model, alphabet = tiny
    with pytest.raises(ValueError, match="attention 'dense': one of per_sequence, jagged, padded, chunked"):
        embed_batch(model, _packed(alphabet), [1], "dense")


@pytest.fixture(scope="module")
def fp32_means(phage_dir):
    """Real proteins and fair-esm's fp32 means of layers 3 and 6 of the seeded random ESM-2 8M."""
    seqs = [seq for _, seq in phage_sample(phage_dir, 20, long=2)]
    model = build_random_esm2(6, 320, 20).eval()
    return seqs, fair_esm_means(model, model.alphabet, seqs, [3, 6])


# The jagged attention (the CUDA default) falls back to a slow math kernel on the CPU: it is checked in fp32 above.
@pytest.mark.parametrize("attention", [PER_SEQUENCE, PADDED, CHUNKED])
def test_bf16_mean_embeddings_match_fp32_fair_esm_on_real_proteins(fp32_means, attention):
    model = build_random_esm2(6, 320, 20).eval()  # the same seeded weights, cast in place below
    alphabet = model.alphabet
    seqs, expected = fp32_means
    batch = pack(alphabet, seqs, 1022)
    with torch.inference_mode():
        embed_batch(model, pack(alphabet, seqs[:2], 1022), [6])  # used in fp32 first, then cast in place
        rows = embed_batch(model.to(torch.bfloat16), batch, [3, 6], attention)
    offsets = batch.offsets
    for layer in (3, 6):
        assert rows[layer].dtype == torch.bfloat16
        means = torch.stack([rows[layer][offsets[i] + 1 : offsets[i + 1] - 1].float().mean(0) for i in range(len(seqs))])
        cosine = torch.nn.functional.cosine_similarity(means, torch.from_numpy(expected[layer]), dim=1)
        assert cosine.min() >= 0.999, cosine


def test_bf16_low_memory_forward_rotates_in_fp32_like_the_fast_one():
    """fair-esm rotates 16-bit positions in 16 bits (past 256 neighbours merge); both our attentions use fp32
    tables, so past position 512 the low-memory rows are as close to fp32 fair-esm as the fast ones."""
    model = build_random_esm2(6, 320, 20).eval()
    sequence = "".join(random.Random(6).choices(AMINO_ACIDS, k=1000))
    _, _, tokens = BatchConverter(model.alphabet, 1022)([("long", sequence)])
    expected = _fair_esm(model, tokens, [6])[6][0, 513:]
    batch = pack(model.alphabet, [sequence], 1022)
    with torch.inference_mode():
        model = model.to(torch.bfloat16)
        fast = embed_batch(model, batch, [6])[6][513:]
        low_memory = embed_batch(model, batch, [6], CHUNKED)[6][513:]
    error = {name: (1 - torch.nn.functional.cosine_similarity(rows.float(), expected, dim=1)).mean()
             for name, rows in (("fast", fast), ("low memory", low_memory))}
    assert error["low memory"] <= 1.5 * error["fast"], error


def test_rows_are_fair_esms_with_autograd_on(tiny):
    """A caller outside inference mode, with weights that require grad (a model being fine-tuned), gets
    the same rows: the forward writes into its own buffers, which autograd would refuse."""
    model, alphabet = tiny
    assert all(p.requires_grad for p in model.parameters()) and torch.is_grad_enabled()
    tokens = _mixed_batch(alphabet)
    rows = embed_batch(model, _packed(alphabet), [2])[2]
    assert (rows - _fair_esm(model, tokens, [2])[2][tokens.ne(alphabet.padding_idx)]).abs().max() <= 1e-4


def test_changed_weights_are_used_at_once(tiny):
    """Every call reads the model's weights as they are: changed in place or replaced, they are used at once."""
    model, alphabet = tiny
    model = copy.deepcopy(model)
    tokens = _mixed_batch(alphabet)[3:]
    batch = _packed(alphabet, _mixed_sequences()[3:])
    real = tokens.ne(alphabet.padding_idx)
    with torch.inference_mode():
        before = embed_batch(model, batch, [2])
    with torch.no_grad():
        model.layers[0].self_attn.k_proj.weight.mul_(2)  # in place
        model.layers[1].self_attn.v_proj.bias = torch.nn.Parameter(model.layers[1].self_attn.v_proj.bias + 1)
    with torch.inference_mode():
        rows = embed_batch(model, batch, [2])
    expected = _fair_esm(model, tokens, [2])[2][real]
    assert (before[2] - expected).abs().max() > 1e-2
    assert (rows[2] - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("attention", [PER_SEQUENCE, PADDED])
def test_bf16_cpu_rows_are_the_same_whatever_rows_fill_the_batch(tiny, attention):
    """On the CPU a 16-bit batch runs with zero rows filling it up to a multiple of CPU_ROWS_MULTIPLE rows:
    they change no real row, and none of them comes back."""
    model, alphabet = tiny
    model = copy.deepcopy(model).to(torch.bfloat16)
    seqs = _mixed_sequences()[2:]
    batch = _packed(alphabet, seqs)
    assert len(batch.tokens) % esm2_forward.CPU_ROWS_MULTIPLE
    layers = list(range(model.num_layers + 1))
    with torch.inference_mode():
        together = embed_batch(model, batch, layers, attention)
        alone = [embed_batch(model, _packed(alphabet, [seq]), layers, attention) for seq in seqs]
        padded = _mixed_batch(alphabet)[2:]
        expected = _fair_esm(model.float(), padded, layers)  # the same bf16-rounded weights
    real = padded.ne(alphabet.padding_idx)
    for layer in layers:
        assert together[layer].shape == (len(batch.tokens), model.embed_dim)
        assert (together[layer].float() - torch.cat([one[layer] for one in alone]).float()).abs().max() <= 0.05
        torch.testing.assert_close(together[layer].float(), expected[layer][real], atol=0.05, rtol=0.05)
