"""The output file: one HDF5 file, rows in input order, filled in by every rank with positioned writes.

Rank 0 creates it through h5py with every dataset at its final size (contiguous, allocated early, never
filled), and writes /ids and /lengths. Afterwards no process writes through the HDF5 library while the
ranks run: each rank looks up the byte offsets of the datasets and `os.pwrite`s its own rows, marking a
row done only after its data is durable. Rank 0 alone reopens the file to mark it complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import h5py
import numpy as np

from extract.errors import UserError

FORMAT_VERSION = 1
TOOL = "esm-features 0.1.0"
INCOMPLETE, COMPLETE = "incomplete", "complete"


@dataclass(frozen=True)
class RowDataset:
    """A dataset of fixed-width rows: `/name`, shape (rows, width)."""

    name: str
    width: int


def _preallocated(group: h5py.Group, name: str, shape: tuple, dtype) -> h5py.Dataset:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # the ranks write every byte; filling would double the I/O
    space = h5py.h5s.create_simple(shape)
    dsid = h5py.h5d.create(group.id, name.encode(), h5py.h5t.py_create(np.dtype(dtype)), space, dcpl=dcpl)
    return h5py.Dataset(dsid)


def create(path: Path, ids: list[str], lengths: np.ndarray, datasets: list[RowDataset], attrs: Mapping) -> None:
    """Write a new, incomplete output file atomically (under a temporary name, then renamed)."""
    partial = path.with_name(path.name + ".creating")
    try:
        with h5py.File(partial, "w") as f:
            f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
            f.create_dataset("lengths", data=lengths.astype(np.int64))
            f.create_dataset("done", data=np.zeros(len(ids), dtype=np.uint8))
            for ds in datasets:
                _preallocated(f.require_group(os.path.dirname(ds.name) or "/"), os.path.basename(ds.name),
                              (len(ids), ds.width), np.float32)
            f.attrs.update({k: _attr(v) for k, v in attrs.items()})
            f.attrs["status"] = INCOMPLETE
        os.replace(partial, path)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot create the output file ({err.strerror or err})") from None


def _attr(value):
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def read_attrs(path: Path) -> dict:
    """The root attributes of an existing output; UserError if it is not one of ours."""
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
    except OSError as err:
        raise UserError(f"{path}: exists but is not a readable HDF5 file ({err}); "
                        f"pass --overwrite to replace it") from None
    if attrs.get("tool", "").split(" ")[0] != TOOL.split(" ")[0] or "fingerprint" not in attrs:
        raise UserError(f"{path}: exists and is not an esm-features output; pass --overwrite to replace it")
    return attrs


def mark_complete(path: Path, extra_attrs: Mapping) -> np.ndarray:
    """Set status to complete if every row is done; return the rows that are not."""
    with h5py.File(path, "r+") as f:
        missing = np.flatnonzero(f["done"][:] == 0)
        f.attrs.update({k: _attr(v) for k, v in extra_attrs.items()})
        if missing.size == 0:
            f.attrs["status"] = COMPLETE
    return missing


class RowWriter:
    """One rank's positioned writes into the datasets rank 0 allocated."""

    def __init__(self, path: Path, datasets: list[RowDataset]):
        with h5py.File(path, "r") as f:
            self._done_offset = f["done"].id.get_offset()
            self._offsets = {ds.name: f[ds.name].id.get_offset() for ds in datasets}
            self.done = f["done"][:]
        self._row_bytes = {ds.name: ds.width * 4 for ds in datasets}
        self._fd = os.open(path, os.O_RDWR)

    def pending_rows(self) -> np.ndarray:
        return np.flatnonzero(self.done == 0)

    def write(self, rows: np.ndarray, values: Mapping[str, np.ndarray]) -> None:
        """Write float32 rows, make them durable, then mark them done."""
        for name, array in values.items():
            array = np.ascontiguousarray(array, dtype=np.float32)
            offset, row_bytes = self._offsets[name], self._row_bytes[name]
            for row, vector in zip(rows, array):
                os.pwrite(self._fd, vector.data, offset + int(row) * row_bytes)
        os.fdatasync(self._fd)
        for row in rows:
            os.pwrite(self._fd, b"\x01", self._done_offset + int(row))
        self.done[rows] = 1

    def close(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
