"""Tiny random-weight ESM-2 checkpoints in Hugging Face's file layouts, made by transformers itself, a hub
cache in the hub's layout, and transformers' own forward to compare against."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from esm.data import Alphabet, BatchConverter
from huggingface_hub.utils import disable_progress_bars
from transformers import EsmConfig, EsmForMaskedLM, EsmModel
from transformers.utils import logging as transformers_logging

# Progress bars and load reports on stderr would mix with the lines the tests read there.
disable_progress_bars()
transformers_logging.disable_progress_bar()
transformers_logging.set_verbosity_error()
ALPHABET = Alphabet.from_architecture("ESM-1b")  # ESM-2's vocabulary, in the hub's order too


def esm2_config(layers: int, width: int, heads: int, token_dropout: bool = True, layer_norm_eps: float = 1e-5,
                **changes) -> EsmConfig:
    """An ESM-2 config as the hub's `facebook/esm2_*` ones are, in a tiny shape."""
    return EsmConfig(vocab_size=33, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=4 * width, position_embedding_type="rotary", token_dropout=token_dropout,
                     emb_layer_norm_before=False, layer_norm_eps=layer_norm_eps, mask_token_id=ALPHABET.mask_idx,
                     pad_token_id=ALPHABET.padding_idx, max_position_embeddings=1026, **changes)


def random_model(config: EsmConfig, seed: int, model_class=EsmForMaskedLM) -> torch.nn.Module:
    """Every parameter random (transformers initialises layer norms to 1 and biases to 0, which would hide a
    mix-up of those weights); the encoder's the same in every model class, as they come first."""
    model = model_class(config).eval()
    torch.manual_seed(seed)  # after building: the heads' initialisers draw numbers too, and models differ in heads
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            is_norm_scale = name.endswith(("LayerNorm.weight", "layer_norm.weight", "emb_layer_norm_after.weight"))
            centre = 1.0 if is_norm_scale else 0.0
            parameter.copy_(centre + 0.1 * torch.randn_like(parameter))
    return model


def save_random_model(directory: Path, config: EsmConfig, seed: int = 0, model_class=EsmForMaskedLM,
                      **save_options) -> Path:
    random_model(config, seed, model_class).save_pretrained(directory, **save_options)
    return directory


def rewrite_as_the_hub_files_are(source: Path, directory: Path, prefix: str = "esm.") -> Path:
    """The same weights spelled as the hub's `facebook/esm2_*` safetensors are: `LayerNorm.weight`/`.bias`,
    one rotary `inv_freq` per layer, and the learned position table (random, unused with rotary positions)
    and `position_ids` that transformers 4 saved; `prefix=""` drops the `esm.` prefix, as an `EsmModel` has
    none."""
    config = json.loads((source / "config.json").read_text())
    state = safetensors.torch.load_file(source / "model.safetensors")
    renamed = {}
    for key, tensor in state.items():
        if "rotary_embeddings.inv_freq" in key:
            continue
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        renamed[prefix + key.removeprefix("esm.")] = tensor.clone()
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for layer in range(config["num_hidden_layers"]):
        renamed[f"{prefix}encoder.layer.{layer}.attention.self.rotary_embeddings.inv_freq"] = inv_freq.clone()
    positions = config["max_position_embeddings"]
    renamed[f"{prefix}embeddings.position_embeddings.weight"] = torch.randn(positions, config["hidden_size"])
    renamed[f"{prefix}embeddings.position_ids"] = torch.arange(positions)[None, :]
    directory.mkdir(parents=True)
    safetensors.torch.save_file(renamed, directory / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(source / "config.json", directory / "config.json")
    return directory


def fair_esm_to_hugging_face(fair_esm_model, directory: Path, token_dropout: bool) -> Path:
    """fair-esm's ESM-2 module written as transformers' `EsmForMaskedLM` checkpoint (transformers ships no
    conversion script any more); transformers' forward on it gives fair-esm's numbers (tested)."""
    state = fair_esm_model.state_dict()
    width, heads, layers = fair_esm_model.embed_dim, fair_esm_model.attention_heads, fair_esm_model.num_layers
    model = EsmForMaskedLM(esm2_config(layers, width, heads, token_dropout=token_dropout)).eval()
    names = {"esm.embeddings.word_embeddings.weight": "embed_tokens.weight",
             "esm.encoder.emb_layer_norm_after.weight": "emb_layer_norm_after.weight",
             "esm.encoder.emb_layer_norm_after.bias": "emb_layer_norm_after.bias"}
    parts = {"attention.self.query": "self_attn.q_proj", "attention.self.key": "self_attn.k_proj",
             "attention.self.value": "self_attn.v_proj", "attention.output.dense": "self_attn.out_proj",
             "attention.LayerNorm": "self_attn_layer_norm", "intermediate.dense": "fc1", "output.dense": "fc2",
             "LayerNorm": "final_layer_norm"}
    for layer in range(layers):
        for theirs, ours in parts.items():
            for parameter in ("weight", "bias"):
                names[f"esm.encoder.layer.{layer}.{theirs}.{parameter}"] = f"layers.{layer}.{ours}.{parameter}"
    with torch.no_grad():
        hf_state = model.state_dict()
        for hf_name, fair_esm_name in names.items():
            hf_state[hf_name].copy_(state[fair_esm_name])
    model.save_pretrained(directory)
    return directory


def fake_hub_cache(cache: Path, repo_id: str, snapshots: dict[str, Path], refs: dict[str, str]) -> Path:
    """A Hugging Face hub cache as `hf download` leaves it: files in `blobs/` named by their digest,
    `snapshots/<commit>/` linking to them, `refs/<branch>` holding a commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for commit, source in snapshots.items():
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for file in sorted(source.iterdir()):
            blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()  # as the hub names them
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(file, blob)
            (snapshot / file.name).symlink_to(Path("../..") / "blobs" / blob.name)
    for branch, commit in refs.items():
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
    return cache


def transformers_tokens(directory: Path, sequences: list[str], layers: list[int],
                        truncation_seq_length: int = 1022) -> list[dict[int, np.ndarray]]:
    """Per sequence, per layer: transformers' `EsmModel` hidden states of BOS and the residues (fair-esm's
    extract truncation), one sequence at a time. `hidden_states[L]` is fair-esm's layer L: the embeddings
    for 0, and for the last layer the output after `emb_layer_norm_after`, as fair-esm's last layer is."""
    model = EsmModel.from_pretrained(directory, add_pooling_layer=False).eval()
    converter = BatchConverter(ALPHABET, truncation_seq_length)
    out = []
    with torch.no_grad():
        for sequence in sequences:
            tokens = converter([("row", sequence)])[2]
            hidden = model(tokens, attention_mask=torch.ones_like(tokens), output_hidden_states=True).hidden_states
            length = min(len(sequence), truncation_seq_length)
            out.append({layer: hidden[layer][0, : length + 1].numpy() for layer in layers})
    return out
