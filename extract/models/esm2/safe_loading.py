"""Reading checkpoint files without running code from them: pickles (fair-esm's `.pt`, `pytorch_model.bin`)
through torch's weights-only unpickler with only the classes a layout needs allowed, safetensors as they are.
Both memory-map the file where its format allows, so the weights are read only when used."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Sequence

import safetensors
import safetensors.torch
import torch

from extract.errors import UserError


def load_pickled(path: Path, allowed: Sequence[type] = ()) -> Any:
    """What the PyTorch checkpoint at `path` holds: tensors, containers, plain values and `allowed` classes,
    nothing else. Only the zip layout (torch >= 1.6) can be memory-mapped; older files are read whole."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        detail = _weights_only_detail(str(err))
        not_pickle = re.fullmatch(r"Unsupported operand (\d+)", detail)
        if not_pickle:  # pickle's own words for a byte that starts no pickle instruction
            raise UserError(f"model {path}: not a readable PyTorch checkpoint (invalid load key, "
                            f"{chr(int(not_pickle[1]))!r})") from None
        raise UserError(f"model {path}: refused: it holds more than weights and settings ({detail}), and loading "
                        f"it would run code from the file; save the weights alone (a state dict, or safetensors)"
                        ) from None
    except (OSError, RuntimeError, EOFError, ValueError, KeyError) as err:
        reason = str(err).split("\n")[0].split(". ")[0].rstrip(".") or type(err).__name__
        raise UserError(f"model {path}: not a readable PyTorch checkpoint ({reason})") from None


def _weights_only_detail(message: str) -> str:
    """The one sentence of torch's weights-only refusal that says what the file asked for."""
    detail = message.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0]
    return re.sub(r"\s+", " ", detail).strip().split(". ")[0].rstrip(".")


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, memory-mapped on the CPU."""
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except (OSError, safetensors.SafetensorError) as err:
        raise UserError(f"model {path}: not a readable safetensors file ({err})") from None
