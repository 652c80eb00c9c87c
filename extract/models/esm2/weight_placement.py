"""Putting a checkpoint's tensors into fair-esm's `ESM2` module without a second copy: the module is built
on the meta device (no random initialisation, no memory), and takes each tensor itself (`assign`), converted
once, straight into the compute dtype on the rank's device."""

from __future__ import annotations

import torch
from esm.model.esm2 import ESM2
from torch.overrides import TorchFunctionMode

# Parts of fair-esm's module that embeddings never use; a checkpoint that lacks them gets zeros.
UNUSED_HEADS = ("lm_head.", "contact_head.")


class ParametersOnMeta(TorchFunctionMode):
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


def converted(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors (weights and the rotary `inv_freq` buffer alike, as `Module.to(dtype)` does) in
    `dtype` on `device`: the tensor itself, no copy, where it is there already. To an accelerator the file's
    values travel as they are and are cast there, which is faster than casting them on the host first."""
    dtype = dtype if tensor.is_floating_point() else tensor.dtype
    return tensor.to(device=device).to(dtype=dtype) if device.type != "cpu" else tensor.to(dtype=dtype)


def assign_weights(model: ESM2, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> None:
    """Load `state` (fair-esm's names, already on `device` in `dtype`) into `model`, built under
    `ParametersOnMeta`. fair-esm ties the LM head's weight to the token embedding: a checkpoint without it
    gets the embedding; the other parts of the unused heads it lacks become zeros (fair-esm's published
    checkpoints keep the contact regression in a separate file). Raises RuntimeError naming missing or
    unexpected weights."""
    tied = {"lm_head.weight": state["embed_tokens.weight"]} if "embed_tokens.weight" in state else {}
    zeros = {name: torch.zeros(meta.shape, device=device, dtype=dtype) for name, meta in model.state_dict().items()
             if name.startswith(UNUSED_HEADS) and name not in state and name not in tied}
    model.load_state_dict({**tied, **zeros, **state}, strict=True, assign=True)
    # fair-esm copies the checkpoint's `lm_head.weight` into the embedding last; assigning untied them, so
    # tie them again on that same tensor.
    model.embed_tokens.weight = model.lm_head.weight


def one_line(err: Exception) -> str:
    """`load_state_dict`'s list of problems (missing, unexpected, mis-shaped weights) as one line."""
    return "; ".join(line.strip().rstrip(".") for line in str(err).splitlines() if not line.startswith("Error(s)"))
