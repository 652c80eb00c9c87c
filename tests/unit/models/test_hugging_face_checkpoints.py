"""Hugging Face ESM-2 checkpoints, made by transformers itself, give what transformers' own forward gives."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from huggingface_hub import scan_cache_dir, try_to_load_from_cache
from transformers import EsmForSequenceClassification, EsmForTokenClassification, EsmModel

from extract.models.esm2 import hub_cache
from extract.models.esm2.checkpoints import load_model
from extract.models.esm2.embedder import Esm2Embedder
from extract.models.long_sequences import LongSequencePolicy
from hugging_face_models import (esm2_config, fake_hub_cache, rewrite_as_the_hub_files_are, save_random_model,
                                 transformers_tokens)
from jobs import REPO, phage_sample

OUTPUTS = ["mean", "bos", "per_tok"]
SHAPES = {  # layers, width, heads, token dropout, layer-norm eps (transformers' default is 1e-12)
    "2x64, token dropout": (2, 64, 4, True, 1e-5),
    "4x48, 1e-12": (4, 48, 6, False, 1e-12),
}


@pytest.fixture(scope="module")
def proteins(phage_dir) -> list[str]:
    """Real tail fibres, one longer than the 1022-residue window (truncated, as fair-esm's extract does)."""
    return [sequence for _, sequence in phage_sample(phage_dir, 4, long=1)]


@pytest.fixture(scope="module", params=list(SHAPES))
def checkpoint(request, tmp_path_factory):
    layers, width, heads, token_dropout, eps = SHAPES[request.param]
    config = esm2_config(layers, width, heads, token_dropout=token_dropout, layer_norm_eps=eps)
    return save_random_model(tmp_path_factory.mktemp("hf") / "model", config, seed=layers)


def _embed(loaded, proteins, layers, dtype=torch.float32, attention="fast") -> dict[str, np.ndarray]:
    policy = LongSequencePolicy.from_options("truncate", 1022, None)
    embedder = Esm2Embedder(loaded, torch.device("cpu"), dtype, layers, policy, OUTPUTS, attention)
    return embedder.embed(embedder.prepare(proteins))


def _expected(checkpoint, proteins, layers) -> dict[str, np.ndarray]:
    tokens = transformers_tokens(checkpoint, proteins, layers)
    expected = {}
    for layer in layers:
        expected[f"mean/layer_{layer}"] = np.stack([row[layer][1:].mean(0) for row in tokens])
        expected[f"bos/layer_{layer}"] = np.stack([row[layer][0] for row in tokens])
        expected[f"per_tok/layer_{layer}"] = np.concatenate([row[layer][1:] for row in tokens])
    return expected


def _layers(checkpoint) -> list[int]:
    layers = load_model(str(checkpoint), device=torch.device("meta")).num_layers
    return [0, layers // 2, layers]


@pytest.mark.parametrize("attention", ["fast", "reference"])
def test_fp32_representations_equal_transformers_forward(checkpoint, proteins, attention):
    layers = _layers(checkpoint)
    got = _embed(load_model(str(checkpoint)), proteins, layers, attention=attention)
    expected = _expected(checkpoint, proteins, layers)
    assert sorted(got) == sorted(expected)
    assert len(got[f"per_tok/layer_{layers[0]}"]) == sum(min(len(p), 1022) for p in proteins)
    for name, values in expected.items():
        assert np.abs(got[name] - values).max() <= 1e-4, name


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_bf16_representations_match_transformers_fp32_forward(checkpoint, proteins):
    layers = _layers(checkpoint)
    loaded = load_model(str(checkpoint), dtype=torch.bfloat16)
    assert {tensor.dtype for tensor in loaded.model.state_dict().values()} == {torch.bfloat16}
    got = _embed(loaded, proteins, layers, dtype=torch.bfloat16)
    for name, values in _expected(checkpoint, proteins, layers).items():
        assert _cosines(got[name].astype(np.float64), values).min() >= 0.999, name


def test_the_layer_norms_take_the_configs_epsilon(checkpoint):
    """fair-esm's layer norms default to torch's 1e-5; transformers' take config.json's `layer_norm_eps`."""
    eps = json.loads((checkpoint / "config.json").read_text())["layer_norm_eps"]
    norms = [module for module in load_model(str(checkpoint)).model.modules() if isinstance(module, torch.nn.LayerNorm)]
    assert len(norms) > 4 and {norm.eps for norm in norms} == {eps}


@pytest.fixture(scope="module")
def spellings(tmp_path_factory):
    """One set of encoder weights in every layout and spelling found in the wild, and the heads each has."""
    root = tmp_path_factory.mktemp("spellings")
    config = esm2_config(2, 32, 4)
    written = root / "transformers"
    save_random_model(written, config)  # LayerNorm.gamma/.beta, one shared `*` inv_freq, as transformers 5 writes
    return {
        "transformers' own": (written, ["contact_head", "lm_head"]),
        "the hub's": (rewrite_as_the_hub_files_are(written, root / "hub"), ["contact_head", "lm_head"]),
        "no esm. prefix": (rewrite_as_the_hub_files_are(written, root / "bare", prefix=""),
                           ["contact_head", "lm_head"]),
        "pytorch_model.bin": (save_random_model(root / "bin", config, safe_serialization=False),
                              ["contact_head", "lm_head"]),
        "sharded": (save_random_model(root / "shards", config, max_shard_size="40KB"), ["contact_head", "lm_head"]),
        "EsmModel": (save_random_model(root / "model", config, model_class=EsmModel), ["contact_head", "pooler"]),
        "sequence classifier": (save_random_model(root / "seq", config, model_class=EsmForSequenceClassification),
                                ["classifier", "contact_head"]),
        "token classifier": (save_random_model(root / "tok", config, model_class=EsmForTokenClassification),
                             ["classifier", "contact_head"]),
    }


@pytest.mark.parametrize("spelling", ["the hub's", "no esm. prefix", "pytorch_model.bin", "sharded", "EsmModel",
                                      "sequence classifier", "token classifier"])
def test_every_spelling_and_kind_loads_the_same_encoder(spellings, spelling):
    directory, heads = spellings[spelling]
    if spelling == "sharded":
        assert len(list(directory.glob("model-*.safetensors"))) > 1
    reference = load_model(str(spellings["transformers' own"][0]))
    loaded = load_model(str(directory))
    assert loaded.heads_left_out == tuple(heads)
    theirs, ours = reference.model.state_dict(), loaded.model.state_dict()
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    assert loaded.model.embed_tokens.weight is loaded.model.lm_head.weight  # tied, as in fair-esm's module


def test_fp32_on_the_cpu_computes_on_the_files_own_pages(spellings):
    """No copy: every encoder weight lies in the memory mapping of `model.safetensors`."""
    directory = spellings["transformers' own"][0]
    model = load_model(str(directory)).model
    weights = directory / "model.safetensors"
    with open("/proc/self/maps") as maps:
        ranges = [tuple(int(address, 16) for address in line.split()[0].split("-"))
                  for line in maps if line.split()[-1] == str(weights.resolve())]
    encoder = [p for name, p in model.named_parameters() if not name.startswith(("lm_head.", "contact_head."))]
    assert ranges and len(encoder) > 20
    assert all(any(start <= p.data_ptr() < stop for start, stop in ranges) for p in encoder)


REPO_ID = "facebook/esm2_tiny_UR50D"
COMMITS = ("a" * 40, "b" * 40)


@pytest.fixture
def hub(tmp_path, spellings, monkeypatch):
    """A hub cache in the hub's layout: main at one commit, tag v1 at another."""
    snapshots = {COMMITS[0]: spellings["transformers' own"][0], COMMITS[1]: spellings["the hub's"][0]}
    cache = fake_hub_cache(tmp_path / "hub", REPO_ID, snapshots, {"main": COMMITS[0], "v1": COMMITS[1]})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("revision, commit", [(None, COMMITS[0]), ("main", COMMITS[0]), ("v1", COMMITS[1]),
                                              (COMMITS[1], COMMITS[1])])
def test_a_repo_id_resolves_where_huggingface_hub_finds_it(hub, revision, commit):
    spec = REPO_ID + (f"@{revision}" if revision else "")
    snapshot = hub_cache.cached_snapshot(spec)
    found = try_to_load_from_cache(REPO_ID, "config.json", cache_dir=hub, revision=revision)
    assert (snapshot.repo_id, snapshot.commit) == (REPO_ID, commit)
    assert snapshot.directory / "config.json" == type(snapshot.directory)(found)
    [repo] = scan_cache_dir(hub).repos  # the hub's own scan takes the tree for a healthy cache
    assert repo.repo_id == REPO_ID and {r.commit_hash for r in repo.revisions} == set(COMMITS)


def test_a_repo_id_loads_its_commits_weights(hub):
    loaded = load_model(f"{REPO_ID}@v1")
    assert (loaded.name, loaded.source, loaded.revision) == (REPO_ID, "hugging-face hub", COMMITS[1])
    assert loaded.heads_left_out == ("contact_head", "lm_head")


@pytest.mark.parametrize("variables", [{}, {"XDG_CACHE_HOME": "/x"}, {"HF_HOME": "/h", "XDG_CACHE_HOME": "/x"},
                                       {"HF_HUB_CACHE": "/c", "HF_HOME": "/h"}, {"HUGGINGFACE_HUB_CACHE": "/old"}])
def test_the_cache_is_where_huggingface_hub_looks(variables):
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME")}
    script = ("from extract.models.esm2.hub_cache import cache_directory; import huggingface_hub.constants as c; "
              "print(cache_directory()); print(c.HF_HUB_CACHE)")
    ours, theirs = subprocess.run([sys.executable, "-c", script], env={**env, **variables}, cwd=REPO,
                                  capture_output=True, text=True, check=True).stdout.split()
    assert ours == theirs


def test_loading_a_hugging_face_checkpoint_imports_neither_transformers_nor_huggingface_hub(spellings):
    """transformers is the tests' reference only: the job maps the weights itself."""
    script = ("import sys; from extract.models.esm2.checkpoints import load_model; load_model(sys.argv[1]); "
              "print(sorted({name.split('.')[0] for name in sys.modules} & {'transformers', 'huggingface_hub'}))")
    directory = spellings["transformers' own"][0]
    imported = subprocess.run([sys.executable, "-c", script, str(directory)], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    assert imported == "[]"
