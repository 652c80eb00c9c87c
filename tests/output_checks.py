"""What tests check about a finished output: complete, and equal to fair-esm's own forward."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from extract.check_output import find_problems
from extract.data.fasta import read_inputs
from fair_esm_reference import fair_esm_means, load_fair_esm
from jobs import ESM2_ALPHABET


def assert_complete_and_like_fair_esm(out: Path, fasta: list[Path], model_path: Path, layer: int = 2) -> None:
    """`out` passes check_output against `fasta`, and its mean embeddings equal fair-esm's."""
    assert find_problems(out, fasta) == []
    inputs = read_inputs(fasta, ESM2_ALPHABET)
    model, alphabet = load_fair_esm(model_path)
    expected = fair_esm_means(model, alphabet, inputs.sequences, [layer])[layer]
    with h5py.File(out, "r") as f:
        assert np.abs(f[f"mean/layer_{layer}"][()] - expected).max() <= 1e-4


def read_all(out: Path) -> tuple[dict, dict]:
    """Every dataset and root attribute of an output."""
    data = {}
    with h5py.File(out, "r") as f:
        f.visititems(lambda name, item: data.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
        return data, dict(f.attrs)
