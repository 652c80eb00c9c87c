"""Weights loaded straight into the compute dtype give fair-esm's own loader's model, exactly."""

import numpy as np
import pytest
import torch

from extract.models.esm2.embedder import Esm2Embedder
from extract.models.long_sequences import LongSequencePolicy
from extract.models.esm2.checkpoints import load_model
from fair_esm_reference import fair_esm_tokens, load_fair_esm

CONTACT_REGRESSION = ("contact_head.regression.weight", "contact_head.regression.bias")
SEQUENCES = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMLE", "MSTNPKPQRKTKRNTNRRPQDVKFPGG"]


def _assert_same_state(ours: dict, theirs: dict, skip=()) -> None:
    assert sorted(ours) == sorted(theirs)
    for key in set(theirs) - set(skip):
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key


def _mapped_ranges(path) -> list[tuple[int, int]]:
    with open("/proc/self/maps") as maps:
        fields = [line.split() for line in maps]
    return [tuple(int(address, 16) for address in f[0].split("-")) for f in fields if f[-1] == str(path)]


def test_fp32_load_gives_fair_esm_loaders_weights(tiny_model_path, fair_esm_tiny):
    ours = load_model(str(tiny_model_path)).model
    theirs, _ = fair_esm_tiny
    _assert_same_state(ours.state_dict(), theirs.state_dict())
    assert ours.embed_tokens.weight is ours.lm_head.weight  # tied, as in fair-esm's module
    assert not ours.training


def test_fp32_on_the_cpu_computes_on_the_files_own_pages(tiny_model_path):
    """No copy at all: every weight the embedder computes with lies in the checkpoint's memory mapping."""
    loaded = load_model(str(tiny_model_path))
    policy = LongSequencePolicy.from_options("truncate", 1022, None)
    embedder = Esm2Embedder(loaded, torch.device("cpu"), torch.float32, [-1], policy)
    ranges = _mapped_ranges(tiny_model_path.resolve())
    tensors = list(embedder.model.parameters()) + list(embedder.model.buffers())
    assert ranges and len(tensors) > 20
    assert all(any(start <= t.data_ptr() < stop for start, stop in ranges) for t in tensors)


def test_bf16_load_gives_fair_esm_model_in_bf16(tiny_model_path):
    ours = load_model(str(tiny_model_path), dtype=torch.bfloat16).model
    theirs, _ = load_fair_esm(tiny_model_path)  # its own: cast to bf16 in place below
    _assert_same_state(ours.state_dict(), theirs.to(torch.bfloat16).state_dict())
    assert ours.layers[0].self_attn.rot_emb.inv_freq.dtype == torch.bfloat16  # a buffer, converted too


@pytest.fixture(scope="module")
def published_layout_path(tmp_path_factory, tiny_model_path):
    """The tiny model as fair-esm publishes its checkpoints: keys under `encoder.sentence_encoder.` /
    `encoder.`, no contact-regression weights (they ship in a separate file)."""
    data = torch.load(tiny_model_path, weights_only=False)
    prefixed = {("encoder." if key.startswith("lm_head.") else "encoder.sentence_encoder.") + key: value
                for key, value in data["model"].items() if key not in CONTACT_REGRESSION}
    path = tmp_path_factory.mktemp("published") / "tiny_published.pt"
    torch.save({"cfg": data["cfg"], "model": prefixed}, path)
    return path


def test_published_layout_loads_as_fair_esm_loads_it(published_layout_path):
    ours = load_model(str(published_layout_path)).model
    theirs, alphabet = load_fair_esm(published_layout_path)  # its contact regression is left random
    _assert_same_state(ours.state_dict(), theirs.state_dict(), skip=CONTACT_REGRESSION)
    assert all(not ours.state_dict()[key].any() for key in CONTACT_REGRESSION)
    # fair-esm's own forward runs on our model, contact head included, and gives its representations.
    with torch.no_grad():
        tokens = alphabet.get_batch_converter()([("a", SEQUENCES[0])])[2]
        assert ours(tokens, return_contacts=True)["contacts"].isfinite().all()
    expected, got = (fair_esm_tokens(model, alphabet, SEQUENCES, [0, 1, 2]) for model in (theirs, ours))
    for want, have in zip(expected, got):
        for layer in (0, 1, 2):
            np.testing.assert_array_equal(have[layer], want[layer])
