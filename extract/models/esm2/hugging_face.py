"""Hugging Face ESM-2 checkpoints as fair-esm's `ESM2` module, the one our forward runs.

A model directory as transformers' `save_pretrained` writes it, for `EsmModel`, `EsmForMaskedLM`,
`EsmForSequenceClassification` or `EsmForTokenClassification` (fine-tunes and merged LoRA alike):
`config.json`, read as JSON (no code), and the weights in `model.safetensors`, shards listed in
`model.safetensors.index.json`, or `pytorch_model.bin` (sharded or not). The encoder is taken and any head
left out. Key spellings of every transformers version are read: `LayerNorm.weight`/`.bias` or
`.gamma`/`.beta`, with or without the `esm.` prefix, with or without rotary `inv_freq` buffers (the module
computes its own, as fair-esm does) and transformers 4's unused learned position table.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from esm.model.esm2 import ESM2

from extract.errors import UserError
from extract.models.esm2.safe_loading import load_pickled, load_safetensors
from extract.models.esm2.weight_placement import (UNUSED_HEADS, ParametersOnMeta, assign_weights, converted,
                                                  one_line)

CONFIG = "config.json"
# In the order transformers prefers them when a directory holds several.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
HEADS = ("lm_head", "classifier", "contact_head", "pooler")
ESM2_VOCAB_SIZE = 33
ESM2_TOKEN_IDS = {"pad_token_id": 1, "mask_token_id": 32}  # fair-esm's alphabet, which ESM-2's vocabulary is
ROTARY_BASE = 10000.0
# What transformers' EsmConfig assumes where config.json says nothing.
CONFIG_DEFAULTS = {"position_embedding_type": "absolute", "layer_norm_eps": 1e-12, "token_dropout": False,
                   "emb_layer_norm_before": False, "rope_theta": ROTARY_BASE}
SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")

# Hugging Face names (without the `esm.` prefix) -> fair-esm's.
TOP_LEVEL = {"embeddings.word_embeddings": "embed_tokens", "encoder.emb_layer_norm_after": "emb_layer_norm_after"}
IN_LAYER = {"attention.self.query": "self_attn.q_proj", "attention.self.key": "self_attn.k_proj",
            "attention.self.value": "self_attn.v_proj", "attention.output.dense": "self_attn.out_proj",
            "attention.LayerNorm": "self_attn_layer_norm", "intermediate.dense": "fc1", "output.dense": "fc2",
            "LayerNorm": "final_layer_norm"}
PARAMETER = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}
KEY = re.compile(r"(?:encoder\.layer\.(?P<layer>\d+)\.)?(?P<module>.+)\.(?P<parameter>weight|bias|gamma|beta)")
# Buffers transformers writes that fair-esm's module computes itself (`*`: one shared by every layer).
COMPUTED = re.compile(r"(?:.*\.)?(?:rotary_embeddings\.inv_freq|position_ids)")
# transformers 4 gives every ESM model a learned absolute position table and saves it, the hub's ESM-2 files
# included; with rotary positions (read_config refuses any other) its forward never reads it.
UNUSED_POSITION_TABLE = "embeddings.position_embeddings.weight"


@dataclass(frozen=True)
class Esm2Config:
    num_layers: int
    embed_dim: int
    attention_heads: int
    token_dropout: bool
    layer_norm_eps: float


def read_config(directory: Path) -> Esm2Config:
    """The ESM-2 shape and settings of `directory/config.json`; anything that is not ESM-2 is refused."""
    path = directory / CONFIG
    if not path.is_file():
        raise UserError(f"model {directory}: no {CONFIG}, so not a Hugging Face model directory"
                        f"{_adapter_hint(directory)}")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"model {path}: not readable JSON ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"model {path}: not a Hugging Face config (no JSON object)")
    config = {**CONFIG_DEFAULTS, **{key: value for key, value in config.items() if value is not None}}
    problem = _not_esm2(config)
    if problem:
        raise UserError(f"model {path}: {problem}")
    return Esm2Config(config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
                      bool(config["token_dropout"]), float(config["layer_norm_eps"]))


def _not_esm2(config: dict) -> str | None:
    """Why the config is not an ESM-2 encoder that fair-esm's module computes exactly, or None."""
    if config.get("model_type") != "esm":
        return f"model_type {config.get('model_type')!r}: not an ESM model"
    if config.get("is_folding_model") or "EsmForProteinFolding" in (config.get("architectures") or []):
        return "ESMFold (EsmForProteinFolding) is a structure model, not an ESM-2 encoder"
    if config["position_embedding_type"] != "rotary":
        return (f"{config['position_embedding_type']} position embeddings (as in ESM-1b's conversion); "
                f"ESM-2's are rotary")
    if config.get("vocab_size") != ESM2_VOCAB_SIZE:
        return f"a vocabulary of {config.get('vocab_size')} tokens; ESM-2's has {ESM2_VOCAB_SIZE}"
    wrong_ids = [f"{key} {config[key]}" for key, index in ESM2_TOKEN_IDS.items() if config.get(key, index) != index]
    if wrong_ids:
        return f"{', '.join(wrong_ids)}; ESM-2's vocabulary has " + " and ".join(
            f"{key.removesuffix('_token_id')} at {index}" for key, index in ESM2_TOKEN_IDS.items())
    if config["emb_layer_norm_before"]:
        return "a layer norm before the first layer (emb_layer_norm_before, as in ESM-1b); ESM-2 has none"
    if config.get("is_decoder") or config.get("add_cross_attention"):
        return "a decoder (is_decoder or add_cross_attention); ESM-2 is an encoder"
    if config["rope_theta"] != ROTARY_BASE:
        return f"rotary base (rope_theta) {config['rope_theta']}; ESM-2's is {ROTARY_BASE:g}"
    return _not_esm2_shape(config)


def _not_esm2_shape(config: dict) -> str | None:
    for key in SHAPE_KEYS:
        if not isinstance(config.get(key), int) or isinstance(config[key], bool) or config[key] < 1:
            return f"{key} {config.get(key)!r}: not a positive whole number"
    if config["hidden_size"] % config["num_attention_heads"]:
        return (f"hidden_size {config['hidden_size']} is no multiple of num_attention_heads "
                f"{config['num_attention_heads']}")
    if config["intermediate_size"] != 4 * config["hidden_size"]:
        return (f"intermediate_size {config['intermediate_size']}; ESM-2's feed-forward layers are 4 x hidden_size "
                f"({4 * config['hidden_size']}) wide")
    return None


def _adapter_hint(directory: Path) -> str:
    if (directory / "adapter_config.json").is_file():
        return ("; it holds a PEFT adapter: merge it into its base model (PEFT's merge_and_unload) and save "
                "that with save_pretrained")
    return ""


def weight_files(directory: Path) -> list[Path]:
    """The files that hold the weights: one, or the shards an index lists (in name order)."""
    for name in WEIGHT_FILES:
        path = directory / name
        if path.is_file():
            return _shards(path) if name.endswith(".index.json") else [path]
    raise UserError(f"model {directory}: no weights (none of {', '.join(WEIGHT_FILES)}){_adapter_hint(directory)}")


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"model {index}: not a readable shard index ({type(err).__name__}: {err})") from None
    for name in names:
        if not isinstance(name, str) or Path(name).name != name:
            raise UserError(f"model {index}: shard {name!r} is not a file name in its directory")
        if not (index.parent / name).is_file():
            raise UserError(f"model {index}: shard {name} is missing")
    return [index.parent / name for name in names]


def build_esm2(config: Esm2Config) -> ESM2:
    """fair-esm's ESM-2 of the config's shape, its parameters on the meta device (to be assigned)."""
    with ParametersOnMeta():
        model = ESM2(config.num_layers, config.embed_dim, config.attention_heads, alphabet="ESM-1b",
                     token_dropout=config.token_dropout)
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = config.layer_norm_eps
    return model


def load_weights(model: ESM2, files: list[Path], device: torch.device, dtype: torch.dtype) -> list[str]:
    """Assign the encoder weights of `files` to `model` (from `build_esm2`), each converted once into `dtype`
    on `device`; returns the heads the checkpoint has that were left out."""
    encoder, heads = {}, set()
    for path in files:
        tensors = _read_tensors(path)
        names, file_heads = _encoder_names(path, tensors)
        encoder.update({name: converted(tensors[key], device, dtype) for key, name in names.items()})
        heads |= file_heads
    computed = {name: converted(buffer, device, dtype) for name, buffer in model.state_dict().items()
                if name.endswith("rot_emb.inv_freq")}
    missing = sorted(name for name in model.state_dict()
                     if name not in encoder and name not in computed and not name.startswith(UNUSED_HEADS))
    if missing:
        raise UserError(f"model {files[0].parent}: not a whole ESM-2 encoder: {len(missing)} weights missing "
                        f"(fair-esm's names: {_first(missing)})")
    try:
        assign_weights(model, {**encoder, **computed}, device, dtype)
    except RuntimeError as err:
        raise UserError(f"model {files[0].parent}: not a usable ESM-2 checkpoint ({one_line(err)})") from None
    return sorted(heads)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    state = load_pickled(path)
    if not (isinstance(state, dict) and all(isinstance(value, torch.Tensor) for value in state.values())):
        raise UserError(f"model {path}: not a state dict (names and tensors)")
    return state


def _encoder_names(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, str], set[str]]:
    """fair-esm's name of each encoder weight of a file, and the heads it holds."""
    names, heads, unknown = {}, set(), []
    for key in tensors:
        name = key.removeprefix("esm.")
        if name.split(".")[0] in HEADS:
            heads.add(name.split(".")[0])
        elif not (COMPUTED.fullmatch(name) or name == UNUSED_POSITION_TABLE):
            fair_esm_name = _fair_esm_name(name)
            if fair_esm_name is None:
                unknown.append(key)
            else:
                names[key] = fair_esm_name
    if any("lora_" in key for key in unknown):
        raise UserError(f"model {path}: holds unmerged LoRA weights ({_first([k for k in unknown if 'lora_' in k])}); "
                        f"merge them into the model (PEFT's merge_and_unload) and save that with save_pretrained")
    if unknown:
        raise UserError(f"model {path}: not an ESM-2 checkpoint: weights ESM-2 does not have ({_first(unknown)})")
    return names, heads


def _fair_esm_name(name: str) -> str | None:
    match = KEY.fullmatch(name)
    if match is None:
        return None
    parameter = PARAMETER[match["parameter"]]
    if match["layer"] is None:
        module = TOP_LEVEL.get(match["module"])
        return module and f"{module}.{parameter}"
    module = IN_LAYER.get(match["module"])
    return module and f"layers.{int(match['layer'])}.{module}.{parameter}"


def _first(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(sorted(names)[:shown]) + more
