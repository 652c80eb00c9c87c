"""Loading ESM-2 once per rank, straight into the compute dtype on its device: by fair-esm name, by path to a
fair-esm `.pt`, or `random:<name>`."""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import zipfile
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import esm
import torch
from esm.model.esm2 import ESM2
from torch.overrides import TorchFunctionMode

from extract.errors import UserError

# fair-esm's published ESM-2 models: name -> (layers, embed_dim, attention_heads).
ESM2_ARCHITECTURES = {
    "esm2_t6_8M_UR50D": (6, 320, 20),
    "esm2_t12_35M_UR50D": (12, 480, 20),
    "esm2_t30_150M_UR50D": (30, 640, 20),
    "esm2_t33_650M_UR50D": (33, 1280, 20),
    "esm2_t36_3B_UR50D": (36, 2560, 40),
    "esm2_t48_15B_UR50D": (48, 5120, 40),
}
HUB_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt"
RANDOM_PREFIX = "random:"
RANDOM_SEED = 0
CPU = torch.device("cpu")


@dataclass(frozen=True)
class LoadedModel:
    model: ESM2
    alphabet: esm.Alphabet
    name: str
    random_weights: bool
    sha256: str | None = None  # of the checkpoint file a path named (`checkpoint_sha256`)

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim


def fair_esm_checkpoint(model: ESM2) -> dict:
    """The `{"cfg": ..., "model": ...}` layout fair-esm's loader reads for ESM-2."""
    cfg = Namespace(
        encoder_layers=model.num_layers,
        encoder_embed_dim=model.embed_dim,
        encoder_attention_heads=model.attention_heads,
        token_dropout=model.token_dropout,
    )
    return {"cfg": {"model": cfg}, "model": model.state_dict()}


def build_random_esm2(
    num_layers: int, embed_dim: int, attention_heads: int, seed: int = RANDOM_SEED
) -> ESM2:
    """An ESM-2 of the given shape with seeded random weights, leaving the global RNG alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ESM2(num_layers, embed_dim, attention_heads, alphabet="ESM-1b", token_dropout=True)


class _ParametersOnMeta(TorchFunctionMode):
    """Modules built inside get their parameters on the meta device (`torch.nn`'s layers allocate them with
    `torch.empty`) and no initialiser runs; the rest, such as the rotary `inv_freq` buffer fair-esm computes,
    is built on the CPU as usual. Arithmetic on meta tensors would import torch._dynamo: 1.5 s a process."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty:
            kwargs = {**kwargs, "device": "meta"}
        elif getattr(func, "__module__", None) == "torch.nn.init":
            return kwargs["tensor"]  # every initialiser passes its tensor on by this keyword
        return func(*args, **kwargs)


def hub_checkpoint_path(name: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / f"{name}.pt"


def fetch_hub_checkpoint(name: str) -> Path:
    """Download a fair-esm checkpoint into torch's hub cache unless it is already there."""
    path = hub_checkpoint_path(name)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(HUB_URL.format(name=name), str(path), progress=False)
        except OSError as err:
            raise UserError(
                f"model {name}: cannot download its weights into {path.parent} ({err}); "
                f"copy {name}.pt there or pass a path to the .pt file"
            ) from None
    return path


def _read_checkpoint(path: Path) -> dict:
    try:
        # fair-esm checkpoints pickle an argparse Namespace, which weights_only refuses. Only the zip
        # layout (torch >= 1.6) can be memory-mapped; older checkpoints are read whole.
        data = torch.load(str(path), map_location="cpu", weights_only=False, mmap=zipfile.is_zipfile(path))
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        reason = str(err).split("\n")[0].split(". ")[0].rstrip(".")
        raise UserError(f"model {path}: not a readable PyTorch checkpoint ({reason})") from None
    if not (isinstance(data, dict) and "cfg" in data and "model" in data):
        raise UserError(f"model {path}: not a fair-esm ESM-2 checkpoint (no 'cfg' and 'model')")
    return data


def _load_checkpoint_file(path: Path, name: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """fair-esm's ESM-2 with the file's weights, each tensor converted once, straight into `dtype` on
    `device`: the module is built on the meta device (no random initialisation, no memory) and takes the
    tensors themselves (`assign`), so fp32 on the CPU uses the memory-mapped file's pages as they are."""
    data = _read_checkpoint(path)
    try:
        with _ParametersOnMeta():  # fair-esm's own ESM-2 construction and state-dict upgrade
            model, alphabet, state = esm.pretrained._load_model_and_alphabet_core_v2(data)
        state = {key: _converted(value, device, dtype) for key, value in state.items()}
        state.update(_zero_contact_regression(model, state, device, dtype))
        model.load_state_dict(state, strict=True, assign=True)
    except (AttributeError, KeyError, RuntimeError) as err:
        problems = "; ".join(line.strip().rstrip(".") for line in str(err).splitlines()
                             if not line.startswith("Error(s)"))
        raise UserError(f"model {path}: not a usable ESM-2 checkpoint ({problems})") from None
    # fair-esm ties the LM head's weight to the token embedding and copies the checkpoint's `lm_head.weight`
    # into it last; assigning untied them, so tie them again on that same tensor.
    model.embed_tokens.weight = model.lm_head.weight
    return LoadedModel(model.eval(), alphabet, name, random_weights=False)


def _converted(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors (weights and the rotary `inv_freq` buffer alike, as `Module.to(dtype)` does) in
    `dtype` on `device`: the tensor itself, no copy, where it is there already. To an accelerator the file's
    values travel as they are and are cast there, which is faster than casting them on the host first."""
    dtype = dtype if tensor.is_floating_point() else tensor.dtype
    return tensor.to(device=device).to(dtype=dtype) if device.type != "cpu" else tensor.to(dtype=dtype)


def _zero_contact_regression(model: ESM2, state: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """fair-esm's published checkpoints keep the contact-regression weights in a separate file, and its loader
    leaves them random; embeddings never use them, so they are zeros here (on `device`, so `to()` works)."""
    regression = model.contact_head.regression
    return {f"contact_head.regression.{name}": torch.zeros(param.shape, device=device, dtype=dtype)
            for name, param in regression.named_parameters() if f"contact_head.regression.{name}" not in state}


def load_model(spec: str, local_leader_first: Callable[[], ContextManager] = contextlib.nullcontext,
               device: torch.device = CPU, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Resolve a `--model` value into an ESM-2 in eval mode, its weights in `dtype` on `device`;
    `local_leader_first` lets one process per node fetch first. On the meta device (a dry run) only the
    model's shape is built: nothing fetched, nothing held."""
    if spec.startswith(RANDOM_PREFIX):
        name = spec[len(RANDOM_PREFIX) :]
        if name not in ESM2_ARCHITECTURES:
            raise UserError(f"model {spec}: unknown ESM-2 name; choose one of {', '.join(ESM2_ARCHITECTURES)}")
        model = _random_esm2_on(device, dtype, ESM2_ARCHITECTURES[name])
        return LoadedModel(model, model.alphabet, name, random_weights=True)
    if spec in ESM2_ARCHITECTURES:
        if device.type == "meta":
            model = _random_esm2_on(device, dtype, ESM2_ARCHITECTURES[spec])
            return LoadedModel(model, model.alphabet, spec, random_weights=False)
        with local_leader_first():
            path = fetch_hub_checkpoint(spec)
        return _load_checkpoint_file(path, spec, device, dtype)
    path = Path(spec)
    if not path.is_file():
        raise UserError(
            f"model {spec}: no such file, and not a fair-esm ESM-2 name "
            f"({', '.join(ESM2_ARCHITECTURES)}) or random:<name>"
        )
    return _load_checkpoint_file(path, path.stem, device, dtype)


def checkpoint_sha256(spec: str) -> str | None:
    """The sha256 of the checkpoint file a path `--model` names: two files of one name may hold other
    weights. None for fair-esm names and random:<name>, whose names say which weights they are. Reads the
    whole file (at about 1.5 GB/s per core: 7 s for ESM-2 3B)."""
    if spec.startswith(RANDOM_PREFIX) or spec in ESM2_ARCHITECTURES:
        return None
    try:
        with open(spec, "rb") as checkpoint:
            return hashlib.file_digest(checkpoint, "sha256").hexdigest()
    except OSError as err:
        raise UserError(f"model {spec}: cannot read it ({err.strerror or err})") from None


def _random_esm2_on(device: torch.device, dtype: torch.dtype, architecture: tuple[int, int, int]) -> ESM2:
    """Seeded random weights are drawn on the CPU in fp32 (the same numbers whatever the device); on the
    meta device nothing is drawn at all."""
    with _ParametersOnMeta() if device.type == "meta" else contextlib.nullcontext():
        model = build_random_esm2(*architecture)
    return model.eval().to(device=device, dtype=dtype)
