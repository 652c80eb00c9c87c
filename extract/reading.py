"""Reading an output: embeddings in input order or by protein id.

    from extract.reading import Embeddings
    with Embeddings("proteins.h5") as emb:
        matrix = emb.in_input_order()              # (proteins, D), rows in FASTA order
        two = emb.by_id(["YP_009818103.1", "NP_040703.1"], layer=33)
        residues = emb.residues("NP_040703.1")      # (embedded residues, D), with --include per_tok
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from extract.output import hdf5_file
from extract.output.hdf5_file import PER_TOKEN_GROUP as PER_TOKEN


class Embeddings:
    """An esm-features output opened for reading. Refuses a file whose job has not finished, unless
    `allow_incomplete`: then rows whose `done` flag is 0 hold no embedding."""

    def __init__(self, path: str | Path, allow_incomplete: bool = False):
        self.path = Path(path)
        self._file = h5py.File(self.path, "r", locking=False)
        try:
            hdf5_file.require_ours(self.path, self._file.attrs)
            if self._file.attrs["status"] != hdf5_file.COMPLETE and not allow_incomplete:
                raise ValueError(f"{self.path}: the job that writes it has not finished "
                                 f"(status {self._file.attrs['status']!r}); rerun it, or pass allow_incomplete=True")
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> "Embeddings":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @cached_property
    def ids(self) -> list[str]:
        """Protein ids, in input order."""
        return list(self._file["ids"].asstr()[:])

    @cached_property
    def _rows(self) -> dict[str, int]:
        return {protein: row for row, protein in enumerate(self.ids)}

    @property
    def done(self) -> np.ndarray:
        return self._file["done"][:].astype(bool)

    def layers(self, kind: str = "mean") -> list[int]:
        """The layers stored for `kind` (mean, bos, ...), ascending."""
        if kind not in self._file:
            raise KeyError(f"{self.path}: no {kind!r} embeddings; it holds {sorted(self._groups())}")
        return sorted(int(name.split("_")[1]) for name in self._file[kind] if name.startswith("layer_"))

    def _groups(self) -> list[str]:
        return [name for name in self._file if isinstance(self._file[name], h5py.Group)]

    def _dataset(self, layer: int | None, kind: str) -> h5py.Dataset:
        if kind == PER_TOKEN:
            raise ValueError(f"{self.path}: {PER_TOKEN} holds one row per residue; use residues(id)")
        return self._layer(layer, kind)

    def _layer(self, layer: int | None, kind: str) -> h5py.Dataset:
        layers = self.layers(kind)
        if layer is None:
            if len(layers) != 1:
                raise ValueError(f"{self.path}: holds {kind} layers {layers}; pass layer= one of them")
            layer = layers[0]
        if layer not in layers:
            raise KeyError(f"{self.path}: no {kind} embeddings of layer {layer}; it holds layers {layers}")
        return self._file[f"{kind}/layer_{layer}"]

    def in_input_order(self, layer: int | None = None, kind: str = "mean") -> np.ndarray:
        """Every protein's embedding, rows in input order. `layer` may be left out if only one is stored."""
        return self._dataset(layer, kind)[:]

    def _row_numbers(self, ids: Sequence[str]) -> np.ndarray:
        missing = [protein for protein in ids if protein not in self._rows]
        if missing:
            raise KeyError(f"{self.path}: no protein with id {missing[0]!r}"
                           + (f" (and {len(missing) - 1} more ids missing)" if len(missing) > 1 else ""))
        return np.array([self._rows[protein] for protein in ids], dtype=np.int64)

    def by_id(self, ids: Sequence[str], layer: int | None = None, kind: str = "mean") -> np.ndarray:
        """The embeddings of the proteins named, in the order named (an id may be named twice)."""
        dataset = self._dataset(layer, kind)
        rows = self._row_numbers(ids)
        if rows.size == 0:
            return dataset[0:0]
        unique, order = np.unique(rows, return_inverse=True)  # h5py reads increasing rows only
        return dataset[unique][order]

    def residues(self, protein: str, layer: int | None = None) -> np.ndarray:
        """One protein's per-residue embeddings (output with --include per_tok), one row per embedded residue."""
        dataset = self._layer(layer, PER_TOKEN)
        (row,) = self._row_numbers([protein])
        start, end = self._file[hdf5_file.TOKEN_OFFSETS][row : row + 2]
        return dataset[start:end]
