"""Whole jobs on Hugging Face checkpoints: the file a converted fair-esm checkpoint gives, the source the output
records and the resume it refuses, and checkpoints refused before any work, none of them running its code."""

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hugging_face_models import (esm2_config, fair_esm_to_hugging_face, fake_hub_cache, save_random_model,
                                 transformers_tokens)
from fair_esm_reference import fair_esm_tokens
from crafted_checkpoints import WritesMarker, code_running_fair_esm_pt
from jobs import job_args, phage_sample, random_proteins, run_in_process, write_fasta
from output_checks import read_all

REPO_ID = "facebook/esm2_tiny_UR50D"
REFUSAL = "exists and was made from other inputs or settings; pass --overwrite to replace it, or choose another --out"
LAYERS = ["--repr-layers", "0", "1", "2"]


def _run(model, fasta, out, *extra) -> int:
    return run_in_process(job_args(model, fasta, out, "--toks-per-batch", "2048", *extra))


@pytest.fixture(scope="module")
def tail_fibres(tmp_path_factory, phage_dir):
    records = phage_sample(phage_dir, 5, long=1)
    return write_fasta(tmp_path_factory.mktemp("fibres") / "fibres.fasta", records), [s for _, s in records]


def test_a_fair_esm_checkpoint_converted_to_hugging_face_gives_the_same_file(tmp_path, tiny_model_path, fair_esm_tiny,
                                                                              tail_fibres, capsys):
    fasta, sequences = tail_fibres
    fair_esm, alphabet = fair_esm_tiny
    converted = fair_esm_to_hugging_face(fair_esm, tmp_path / "converted", fair_esm.token_dropout)
    # The conversion is right: transformers' forward on it gives fair-esm's.
    for theirs, ours in zip(fair_esm_tokens(fair_esm, alphabet, sequences[:2], [0, 2]),
                            transformers_tokens(converted, sequences[:2], [0, 2])):
        for layer in (0, 2):
            assert np.abs(ours[layer] - theirs[layer]).max() <= 1e-5
    outputs = {}
    for name, model in (("pt", tiny_model_path), ("hf", converted)):
        assert _run(model, fasta, tmp_path / f"{name}.h5", *LAYERS, "--include", "mean", "bos", "per_tok") == 0
        outputs[name] = read_all(tmp_path / f"{name}.h5")
    assert "heads left out: contact_head, lm_head" in capsys.readouterr().err
    (pt_data, pt_attrs), (hf_data, hf_attrs) = outputs["pt"], outputs["hf"]
    assert sorted(hf_data) == sorted(pt_data) and "per_tok/layer_1" in hf_data
    for name, values in pt_data.items():
        if values.dtype.kind == "f":
            assert np.abs(hf_data[name] - values).max() <= 1e-5, name
        else:
            np.testing.assert_array_equal(hf_data[name], values)
    assert (pt_attrs["model_source"], hf_attrs["model_source"]) == ("fair-esm file", "hugging-face directory")
    assert hf_attrs["model"] == "converted" and "model_revision" not in hf_attrs
    listing = "".join(f"{hashlib.sha256((converted / name).read_bytes()).hexdigest()}  {name}\n"
                      for name in ("config.json", "model.safetensors"))
    assert hf_attrs["model_sha256"] == hashlib.sha256(listing.encode()).hexdigest()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A hub cache whose main branch is at commit a..a; commit b..b holds other weights."""
    config = esm2_config(2, 32, 4)
    snapshots = {"a" * 40: save_random_model(tmp_path / "a", config, seed=1),
                 "b" * 40: save_random_model(tmp_path / "b", config, seed=2)}
    cache = fake_hub_cache(tmp_path / "hub", REPO_ID, snapshots, {"main": "a" * 40})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache, snapshots


def test_a_hub_repo_id_is_recorded_with_its_commit_and_a_resume_on_another_commit_is_refused(tmp_path, hub, capsys):
    cache, snapshots = hub
    sequences = [seq for _, seq in random_proteins(4, max_len=60)]
    fasta = write_fasta(tmp_path / "in.fasta", [(f"p{i}", seq) for i, seq in enumerate(sequences)])
    out = tmp_path / "out.h5"
    assert _run(REPO_ID, fasta, out) == 0
    data, attrs = read_all(out)
    assert (attrs["model"], attrs["model_source"], attrs["model_revision"]) == (REPO_ID, "hugging-face hub", "a" * 40)
    expected = np.stack([tokens[2][1:].mean(0) for tokens in transformers_tokens(snapshots["a" * 40], sequences, [2])])
    assert np.abs(data["mean/layer_2"] - expected).max() <= 1e-4
    before = out.read_bytes()
    (cache / f"models--{REPO_ID.replace('/', '--')}" / "refs" / "main").write_text("b" * 40)  # main moved on
    capsys.readouterr()
    assert _run(REPO_ID, fasta, out) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"esm_features: error: {out}: {REFUSAL}"
    assert out.read_bytes() == before


def test_a_dry_run_names_the_commit_without_reading_weights(tmp_path, hub, capsys):
    fasta = write_fasta(tmp_path / "in.fasta", random_proteins(3, max_len=40))
    assert _run(f"{REPO_ID}@{'a' * 40}", fasta, tmp_path / "out.h5", "--dry-run") == 0
    settings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("settings:")]
    assert f"model {REPO_ID}, model_source hugging-face hub, model_revision {'a' * 40}, model_sha256 " in settings[0]
    assert not (tmp_path / "out.h5").exists()


def _code_running_checkpoints(folder, marker):
    code_running_fair_esm_pt(folder / "crafted.pt", marker)
    directory = save_random_model(folder / "crafted_hf", esm2_config(1, 16, 2))
    (directory / "model.safetensors").unlink()
    torch.save({"esm.embeddings.word_embeddings.weight": WritesMarker(marker)}, directory / "pytorch_model.bin")
    return {"fair-esm .pt": (folder / "crafted.pt", folder / "crafted.pt"),
            "pytorch_model.bin": (directory, directory / "pytorch_model.bin")}


@pytest.mark.parametrize("case", ["fair-esm .pt", "pytorch_model.bin"])
def test_a_checkpoint_whose_loading_would_run_code_is_refused_and_the_code_never_runs(tmp_path, capsys, case):
    marker = tmp_path / "marker"
    model, named = _code_running_checkpoints(tmp_path, marker)[case]
    torch.load(named, weights_only=False)  # what the file does when unpickled unguarded: it writes the marker
    assert marker.exists()
    marker.unlink()
    fasta = write_fasta(tmp_path / "in.fasta", random_proteins(2, max_len=30))
    assert _run(model, fasta, tmp_path / "out.h5") == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"esm_features: error: model {named}: refused: it holds more than weights and settings "
                           f"(Unsupported global: GLOBAL io.open was not an allowed global by default), and loading "
                           f"it would run code from the file; save the weights alone (a state dict, or safetensors)")
    assert not marker.exists()
    assert not (tmp_path / "out.h5").exists()


def _edited_config(folder, name, **changes):
    directory = save_random_model(folder / name, esm2_config(1, 16, 2))
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))
    return directory


def _unusable_checkpoints(folder):
    esmfold = _edited_config(folder, "esmfold", architectures=["EsmForProteinFolding"], is_folding_model=True)
    lora = save_random_model(folder / "lora", esm2_config(1, 16, 2))
    weights = load_file(lora / "model.safetensors")
    weights["esm.encoder.layer.0.attention.self.query.lora_A.default.weight"] = torch.zeros(4, 16)
    save_file(weights, lora / "model.safetensors")
    adapter = folder / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    incomplete = save_random_model(folder / "incomplete", esm2_config(1, 16, 2))
    weights = load_file(incomplete / "model.safetensors")
    del weights["esm.encoder.layer.0.output.dense.bias"]
    save_file(weights, incomplete / "model.safetensors")
    no_weights = save_random_model(folder / "no_weights", esm2_config(1, 16, 2))
    (no_weights / "model.safetensors").unlink()
    broken_ref = folder / "empty" / "models--someone--esm2_broken" / "refs" / "main"
    broken_ref.parent.mkdir(parents=True)
    broken_ref.write_text("../../../elsewhere\n")
    return {
        "ESMFold": (esmfold, f"model {esmfold / 'config.json'}: ESMFold (EsmForProteinFolding) is a structure "
                             f"model, not an ESM-2 encoder"),
        "ESM-1b": (_edited_config(folder, "esm1b", position_embedding_type="absolute"),
                   "config.json: absolute position embeddings (as in ESM-1b's conversion); ESM-2's are rotary"),
        "vocabulary": (_edited_config(folder, "vocab", vocab_size=35),
                       "config.json: a vocabulary of 35 tokens; ESM-2's has 33"),
        "feed-forward": (_edited_config(folder, "ffn", intermediate_size=48),
                         "config.json: intermediate_size 48; ESM-2's feed-forward layers are 4 x hidden_size (64) "
                         "wide"),
        "layer norm before": (_edited_config(folder, "norm_before", emb_layer_norm_before=True),
                              "config.json: a layer norm before the first layer (emb_layer_norm_before, as in "
                              "ESM-1b); ESM-2 has none"),
        "not ESM": (_edited_config(folder, "bert", model_type="bert"),
                    "config.json: model_type 'bert': not an ESM model"),
        "unmerged LoRA": (lora, "model.safetensors: holds unmerged LoRA weights "
                                "(esm.encoder.layer.0.attention.self.query.lora_A.default.weight); merge them into "
                                "the model (PEFT's merge_and_unload) and save that with save_pretrained"),
        "PEFT adapter": (adapter, f"model {adapter}: no config.json, so not a Hugging Face model directory; it holds "
                                  f"a PEFT adapter: merge it into its base model (PEFT's merge_and_unload) and save "
                                  f"that with save_pretrained"),
        "incomplete": (incomplete, f"model {incomplete}: not a whole ESM-2 encoder: 1 weights missing (fair-esm's "
                                   f"names: layers.0.fc2.bias)"),
        "no weights": (no_weights, f"model {no_weights}: no weights (none of model.safetensors, "
                                   f"model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json)"),
        "weights file": (no_weights / "config.json", f"model {no_weights / 'config.json'}: a file of a Hugging Face "
                                                     f"model; pass its directory, {no_weights}"),
        "not cached": ("facebook/esm2_t33_650M_UR50D@v2",
                       f"model facebook/esm2_t33_650M_UR50D@v2: not in the Hugging Face cache {folder / 'empty'} (no "
                       f"{folder / 'empty' / 'models--facebook--esm2_t33_650M_UR50D' / 'refs' / 'v2'}); fetch it "
                       f"where there is network with `hf download facebook/esm2_t33_650M_UR50D --revision v2` "
                       f"(HF_HUB_CACHE or HF_HOME choose the cache), or pass the model's directory"),
        "broken ref": ("someone/esm2_broken", f"model someone/esm2_broken: {broken_ref} holds no commit hash; fetch "
                                              f"the model again with `hf download someone/esm2_broken`"),
    }


CASES = ["ESMFold", "ESM-1b", "vocabulary", "feed-forward", "layer norm before", "not ESM", "unmerged LoRA",
         "PEFT adapter", "incomplete", "no weights", "weights file", "not cached", "broken ref"]


@pytest.fixture(scope="module")
def unusable_checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unusable")
    return folder, _unusable_checkpoints(folder)


@pytest.mark.parametrize("case", CASES)
def test_a_checkpoint_that_is_not_esm2_is_refused_before_any_work(tmp_path, unusable_checkpoints, capsys, monkeypatch,
                                                                   case):
    folder, cases = unusable_checkpoints
    monkeypatch.setenv("HF_HUB_CACHE", str(folder / "empty"))
    model, problem = cases[case]
    out = tmp_path / "out" / "out.h5"
    out.parent.mkdir()
    code = run_in_process(job_args(model, tmp_path / "missing.fasta", out))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("esm_features: error: model ") and err.endswith(problem), err
    assert list(out.parent.iterdir()) == []
