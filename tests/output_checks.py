"""What tests check about a finished output: complete, and equal to fair-esm's own forward."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

from extract.check_output import find_problems
from extract.data.fasta import read_inputs
from fair_esm_reference import fair_esm_means
from jobs import ESM2_ALPHABET


def assert_complete_and_like_fair_esm(out: Path, fasta: list[Path], fair_esm: tuple, layer: int = 2) -> None:
    """`out` passes check_output against `fasta`, and its mean embeddings equal those of fair-esm's
    (model, alphabet): within 1e-4 when computed in fp32, at a cosine of at least 0.999 in bf16 (what
    `--dtype auto` gives on a CPU with AMX)."""
    assert find_problems(out, fasta) == []
    inputs = read_inputs(fasta, ESM2_ALPHABET)
    model, alphabet = fair_esm
    expected = fair_esm_means(model, alphabet, inputs.sequences, [layer])[layer]
    with h5py.File(out, "r") as f:
        means, dtype = f[f"mean/layer_{layer}"][()], f.attrs["compute_dtype"]
    if dtype == "fp32":
        assert np.abs(means - expected).max() <= 1e-4
    else:
        assert dtype == "bf16", dtype
        assert lowest_cosine(means, expected) >= 0.999


def lowest_cosine(ours: np.ndarray, theirs: np.ndarray) -> float:
    """The lowest cosine between matching rows (last axis) of `ours` and `theirs`."""
    cosine = (ours * theirs).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(theirs, axis=-1))
    return float(cosine.min())


def read_all(out: Path) -> tuple[dict, dict]:
    """Every dataset and root attribute of an output."""
    data = {}
    with h5py.File(out, "r") as f:
        f.visititems(lambda name, item: data.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
        return data, dict(f.attrs)


def assert_same_as_fair_esms_files(ours: Path, theirs: Path, layers: list[int]) -> None:
    """The `.pt` files in `ours` are those fair-esm's extract wrote in `theirs`: the same paths, dicts with
    the same keys in the same order, the same label, `layers` as keys, float32 CPU tensors of the same
    shape and values (within 1e-5), each holding only its own values (as fair-esm's clones do)."""
    names = sorted(str(p.relative_to(theirs)) for p in theirs.rglob("*.pt"))
    assert sorted(str(p.relative_to(ours)) for p in ours.rglob("*") if p.is_file()) == names
    for name in names:
        got, expected = (torch.load(where / name, weights_only=True) for where in (ours, theirs))
        assert list(got) == list(expected)
        assert got["label"] == expected["label"]
        for key in list(expected)[1:]:
            assert list(got[key]) == list(expected[key]) == layers
            for layer, values in expected[key].items():
                tensor = got[key][layer]
                assert tensor.dtype == torch.float32 and tensor.device.type == "cpu" and tensor.shape == values.shape
                assert (tensor - values).abs().max() <= 1e-5, (name, key, layer)
                assert tensor.untyped_storage().nbytes() == 4 * tensor.numel()
