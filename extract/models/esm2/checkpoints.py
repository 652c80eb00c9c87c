"""Loading ESM-2 once per rank, straight into the compute dtype on its device, from what `--model` names: a
fair-esm name, a path to a fair-esm `.pt`, a Hugging Face model directory or hub repo id (`hugging_face`,
`hub_cache`), or `random:<name>`. No loading runs code from a file (`safe_loading`)."""

from __future__ import annotations

import contextlib
import hashlib
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import esm
import torch
from esm.model.esm2 import ESM2

from extract.errors import UserError
from extract.models.esm2 import hub_cache, hugging_face
from extract.models.esm2.safe_loading import load_pickled
from extract.models.esm2.weight_placement import ParametersOnMeta, assign_weights, converted, one_line

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
# Where the weights came from, as the output's `model_source` attribute says.
FAIR_ESM_NAME, FAIR_ESM_FILE, HUB_REPO, MODEL_DIRECTORY, RANDOM = (
    "fair-esm", "fair-esm file", "hugging-face hub", "hugging-face directory", "random")


@dataclass(frozen=True)
class LoadedModel:
    model: ESM2
    alphabet: esm.Alphabet
    name: str
    random_weights: bool
    source: str
    files: tuple[Path, ...] = ()  # the checkpoint's files that `checkpoint_sha256` digests
    revision: str | None = None  # the Hugging Face hub commit
    heads_left_out: tuple[str, ...] = ()
    sha256: str | None = None  # `checkpoint_sha256`

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


def read_fair_esm_checkpoint(path: Path) -> dict:
    """A fair-esm `.pt` checkpoint's dict (its `cfg`, `model`, ...), read without running code from the file."""
    data = load_pickled(path, allowed=[Namespace])  # fair-esm keeps its settings in an argparse Namespace
    if not (isinstance(data, dict) and "cfg" in data and "model" in data):
        raise UserError(f"model {path}: not a fair-esm ESM-2 checkpoint (no 'cfg' and 'model')")
    return data


def _load_checkpoint_file(path: Path, device: torch.device, dtype: torch.dtype) -> ESM2:
    """fair-esm's ESM-2 with the file's weights, each tensor converted once, straight into `dtype` on
    `device` (`weight_placement`): fp32 on the CPU uses the memory-mapped file's pages as they are."""
    data = read_fair_esm_checkpoint(path)
    try:
        with ParametersOnMeta():  # fair-esm's own ESM-2 construction and state-dict upgrade
            model, _, state = esm.pretrained._load_model_and_alphabet_core_v2(data)
        assign_weights(model, {key: converted(value, device, dtype) for key, value in state.items()}, device, dtype)
    except (AttributeError, KeyError, RuntimeError) as err:
        raise UserError(f"model {path}: not a usable ESM-2 checkpoint ({one_line(err)})") from None
    return model.eval()


def load_model(spec: str, local_leader_first: Callable[[], ContextManager] = contextlib.nullcontext,
               device: torch.device = CPU, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Resolve a `--model` value into an ESM-2 in eval mode, its weights in `dtype` on `device`;
    `local_leader_first` lets one process per node fetch first. On the meta device (a dry run) only the
    model's shape is built: nothing fetched, no weights read, nothing held."""
    if spec.startswith(RANDOM_PREFIX):
        name = spec[len(RANDOM_PREFIX) :]
        if name not in ESM2_ARCHITECTURES:
            raise UserError(f"model {spec}: unknown ESM-2 name; choose one of {', '.join(ESM2_ARCHITECTURES)}")
        model = _random_esm2_on(device, dtype, ESM2_ARCHITECTURES[name])
        return LoadedModel(model, model.alphabet, name, random_weights=True, source=RANDOM)
    if spec in ESM2_ARCHITECTURES:
        if device.type == "meta":
            model = _random_esm2_on(device, dtype, ESM2_ARCHITECTURES[spec])
        else:
            with local_leader_first():
                path = fetch_hub_checkpoint(spec)
            model = _load_checkpoint_file(path, device, dtype)
        return LoadedModel(model, model.alphabet, spec, random_weights=False, source=FAIR_ESM_NAME)
    path = Path(spec)
    if path.is_dir():
        return _load_hugging_face(path, path.resolve().name, MODEL_DIRECTORY, None, device, dtype)
    if path.is_file():
        if path.name in (hugging_face.CONFIG, *hugging_face.WEIGHT_FILES):
            raise UserError(f"model {spec}: a file of a Hugging Face model; pass its directory, {path.parent}")
        return _fair_esm_file(path, device, dtype)
    if hub_cache.is_repo_id(spec):
        snapshot = hub_cache.cached_snapshot(spec)
        return _load_hugging_face(snapshot.directory, snapshot.repo_id, HUB_REPO, snapshot.commit, device, dtype)
    raise UserError(f"model {spec}: no such file or directory, and not a fair-esm ESM-2 name "
                    f"({', '.join(ESM2_ARCHITECTURES)}), a Hugging Face repo id (owner/name[@revision]) "
                    f"or random:<name>")


def _fair_esm_file(path: Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    model = _load_checkpoint_file(path, device, dtype)
    return LoadedModel(model, model.alphabet, path.stem, random_weights=False, source=FAIR_ESM_FILE, files=(path,))


def _load_hugging_face(directory: Path, name: str, source: str, revision: str | None, device: torch.device,
                       dtype: torch.dtype) -> LoadedModel:
    config = hugging_face.read_config(directory)
    files = hugging_face.weight_files(directory)
    model = hugging_face.build_esm2(config)
    if device.type == "meta":
        model, heads = model.to(device=device, dtype=dtype), []
    else:
        heads = hugging_face.load_weights(model, files, device, dtype)
    return LoadedModel(model.eval(), model.alphabet, name, random_weights=False, source=source,
                       files=(directory / hugging_face.CONFIG, *files), revision=revision,
                       heads_left_out=tuple(heads))


def checkpoint_sha256(loaded: LoadedModel) -> str | None:
    """What tells apart checkpoints of one name: for a fair-esm `.pt`, the file's sha256; for a Hugging Face
    checkpoint, the sha256 of its files' listing as `sha256sum config.json <weight files>` prints it (name
    order). None for fair-esm names and random:<name>, whose names say which weights they are. Reads every
    file whole (at about 1.5 GB/s per core: 7 s for ESM-2 3B)."""
    digests = sorted((path.name, _file_sha256(path)) for path in loaded.files)
    if len(digests) <= 1:
        return digests[0][1] if digests else None
    return hashlib.sha256("".join(f"{digest}  {name}\n" for name, digest in digests).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    try:
        with open(path, "rb") as checkpoint:
            return hashlib.file_digest(checkpoint, "sha256").hexdigest()
    except OSError as err:
        raise UserError(f"model {path}: cannot read it ({err.strerror or err})") from None


def _random_esm2_on(device: torch.device, dtype: torch.dtype, architecture: tuple[int, int, int]) -> ESM2:
    """Seeded random weights are drawn on the CPU in fp32 (the same numbers whatever the device); on the
    meta device nothing is drawn at all."""
    with ParametersOnMeta() if device.type == "meta" else contextlib.nullcontext():
        model = build_random_esm2(*architecture)
    return model.eval().to(device=device, dtype=dtype)
