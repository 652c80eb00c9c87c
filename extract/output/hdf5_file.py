"""The output file: one HDF5 file, rows in input order, filled in by every rank with positioned writes.

Rank 0 creates it through h5py with every dataset at its final size (contiguous, allocated early, never
filled), and writes /ids, /lengths, /truncated and /per_tok/offsets. Afterwards no process writes through
the HDF5 library while the ranks run: each rank looks up the byte offsets of the datasets and `os.pwrite`s
its own rows, marking a row done only after its data is durable. Rank 0 alone reopens the file to mark it
complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import h5py
import numpy as np

from extract.errors import JobError, UserError
from extract.output.durability import sync

FORMAT_VERSION = 1
TOOL = "esm-features 0.1.0"
INCOMPLETE, COMPLETE = "incomplete", "complete"
PER_TOKEN_GROUP = "per_tok"
TOKEN_OFFSETS = f"{PER_TOKEN_GROUP}/offsets"
STORAGE_DTYPES = ("float32", "float16")
# HDF5's superblock, object headers and attributes, and per id a global-heap entry and its reference.
FIXED_OVERHEAD_BYTES = 64 * 1024
ID_OVERHEAD_BYTES = 48
BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
LOCK_WAIT_SECONDS, LOCK_POLL_SECONDS = 30.0, 0.5  # for a reader holding the file when the run ends
IDS_PER_WRITE = 1 << 20  # ids go to /ids in slices, so that no more of them exist as Python strings at once


@dataclass(frozen=True)
class RowDataset:
    """A dataset of fixed-width rows: `/name`, shape (records, width), or with `per_token` one row per
    embedded residue, shape (embedded residues, width), record i at rows /per_tok/offsets[i:i+2]."""

    name: str
    width: int
    per_token: bool = False


@dataclass(frozen=True)
class FileLayout:
    """What decides the file's datasets and size."""

    ids: Sequence[str]
    lengths: np.ndarray  # residues per record
    covered: np.ndarray  # residues per record that its representations cover
    datasets: list[RowDataset]
    storage_dtype: str
    id_bytes: int | None = None  # UTF-8 bytes of all ids; None counts them in `ids`

    def rows(self, ds: RowDataset) -> int:
        return int(self.covered.sum()) if ds.per_token else len(self.ids)

    def planned_bytes(self) -> int:
        """The file's size once written: every dataset plus an allowance for HDF5's own metadata."""
        item = np.dtype(self.storage_dtype).itemsize
        values = sum(self.rows(ds) * ds.width * item for ds in self.datasets)
        records = len(self.ids)
        per_record = 8 + 1 + 1 + ID_OVERHEAD_BYTES  # lengths, done, truncated, id reference and heap entry
        offsets = 8 * (records + 1) if any(ds.per_token for ds in self.datasets) else 0
        id_text = sum(len(i.encode()) for i in self.ids) if self.id_bytes is None else self.id_bytes
        return values + offsets + records * per_record + id_text + FIXED_OVERHEAD_BYTES


def _preallocated(group: h5py.Group, name: str, shape: tuple, dtype) -> h5py.Dataset:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # the ranks write every byte; filling would double the I/O
    space = h5py.h5s.create_simple(shape)
    dsid = h5py.h5d.create(group.id, name.encode(), h5py.h5t.py_create(np.dtype(dtype)), space, dcpl=dcpl)
    return h5py.Dataset(dsid)


def create(path: Path, layout: FileLayout, attrs: Mapping) -> None:
    """Write a new, incomplete output file atomically (under a temporary name, then renamed)."""
    partial = path.with_name(path.name + ".creating")
    try:
        with h5py.File(partial, "w") as f:
            id_dataset = f.create_dataset("ids", shape=(len(layout.ids),), dtype=h5py.string_dtype())
            for start in range(0, len(layout.ids), IDS_PER_WRITE):
                id_dataset[start : start + IDS_PER_WRITE] = np.array(layout.ids[start : start + IDS_PER_WRITE],
                                                                     dtype=object)
            f.create_dataset("lengths", data=layout.lengths.astype(np.int64))
            f.create_dataset("truncated", data=(layout.covered < layout.lengths).astype(np.uint8))
            f.create_dataset("done", data=np.zeros(len(layout.ids), dtype=np.uint8))
            if any(ds.per_token for ds in layout.datasets):
                f.create_dataset(TOKEN_OFFSETS, data=np.concatenate([[0], np.cumsum(layout.covered)]).astype(np.int64))
            for ds in layout.datasets:
                _preallocated(f.require_group(os.path.dirname(ds.name) or "/"), os.path.basename(ds.name),
                              (layout.rows(ds), ds.width), layout.storage_dtype)
            f.attrs.update({k: _attr(v) for k, v in attrs.items()})
            f.attrs["status"] = INCOMPLETE
        sync(partial)  # durable before it takes the output's name: a crash leaves the old file or this one
        os.replace(partial, path)
        sync(path.parent)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot create the output file ({err.strerror or err})") from None
    except BaseException:  # e.g. a stop signal before the job owns its output
        partial.unlink(missing_ok=True)
        raise


def check_room(path: Path, planned_bytes: int) -> int:
    """Refuse an output whose file system cannot hold what is still to be written; returns its free bytes.

    The file is sparse until the ranks write, so an existing output (resumed, or replaced by
    --overwrite) already holds its allocated blocks towards the total."""
    if not path.parent.is_dir():
        raise UserError(f"{path}: cannot create the output file (no such directory {path.parent})")
    free = shutil.disk_usage(path.parent).free
    held = path.stat().st_blocks * 512 if path.exists() else 0
    if planned_bytes - held > free:
        raise UserError(f"{path}: the output needs {format_bytes(planned_bytes - held)} more but its file system has "
                        f"{format_bytes(free)} free; free some space or choose another --out")
    return free


def format_bytes(count: int) -> str:
    power = 0
    while power < len(BYTE_UNITS) - 1 and count >= 1024 ** (power + 1):
        power += 1
    return f"{count} B" if power == 0 else f"{count / 1024 ** power:.1f} {BYTE_UNITS[power]}"


def _attr(value):
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def read_attrs(path: Path) -> dict:
    """The root attributes of an existing output; UserError if it is not one of ours."""
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
    except OSError as err:
        raise UserError(f"{path}: exists but is not a readable HDF5 file ({err})") from None
    require_ours(path, attrs)
    return attrs


def require_ours(path: Path, attrs: Mapping) -> None:
    if attrs.get("tool", "").split(" ")[0] != TOOL.split(" ")[0] or "fingerprint" not in attrs:
        raise UserError(f"{path}: exists and is not an esm-features output")


def mark_complete(path: Path, extra_attrs: Mapping) -> np.ndarray:
    """Set status to complete if every row is done; return the rows that are not."""
    try:
        with _opened_for_update(path) as f:
            missing = np.flatnonzero(f["done"][:] == 0)
            f.attrs.update({k: _attr(v) for k, v in extra_attrs.items()})
            if missing.size == 0:
                f.attrs["status"] = COMPLETE
        sync(path)  # "complete" is said only once the file says so durably
    except OSError as err:
        raise JobError(f"{path}: cannot record the end of this run ({err}); every finished row is kept; "
                       f"rerun the same command to finish") from None
    return missing


def _opened_for_update(path: Path) -> h5py.File:
    """The file opened read-write through HDF5, waiting up to LOCK_WAIT_SECONDS for readers that hold it
    open with HDF5's file lock (h5py's default) to close it."""
    waited_until = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            return h5py.File(path, "r+")
        except BlockingIOError:
            if time.monotonic() > waited_until:
                raise JobError(f"{path}: another process holds it open (HDF5's file lock), so this run cannot mark "
                               f"it; every finished row is kept; close it (read with h5py.File(..., locking=False) "
                               f"while a job runs) and rerun the same command to finish") from None
            time.sleep(LOCK_POLL_SECONDS)


class DoneFlags:
    """The /done flags, read with plain positioned reads: no HDF5 file lock is taken and no writer waits,
    so rank 0 (or anyone) can watch a running job's progress."""

    def __init__(self, path: Path):
        with h5py.File(path, "r", locking=False) as f:
            self._offset = f["done"].id.get_offset()
            self._rows = f["done"].shape[0]
        self._fd = os.open(path, os.O_RDONLY)

    def read(self) -> np.ndarray:
        flags = bytearray()
        while len(flags) < self._rows:  # one pread returns at most about 2 GiB
            chunk = os.pread(self._fd, self._rows - len(flags), self._offset + len(flags))
            if not chunk:
                raise OSError(f"the /done flags end early ({len(flags)} of {self._rows} bytes)")
            flags += chunk
        return np.frombuffer(flags, dtype=np.uint8)

    def close(self) -> None:
        os.close(self._fd)


class RowWriter:
    """One rank's positioned writes into the datasets rank 0 allocated. Also a context manager that closes
    it. A write that fails (a full disk, a file-size limit) raises JobError; no row is marked done before
    its values are durable."""

    def __init__(self, path: Path, datasets: list[RowDataset]):
        with h5py.File(path, "r") as f:
            self._done_offset = f["done"].id.get_offset()
            self._offsets = {ds.name: f[ds.name].id.get_offset() for ds in datasets}
            self._dtypes = {ds.name: f[ds.name].dtype for ds in datasets}
            self._token_offsets = f[TOKEN_OFFSETS][:] if any(ds.per_token for ds in datasets) else None
            self.done = f["done"][:]
        self.path = path
        self._row_bytes = {ds.name: ds.width * self._dtypes[ds.name].itemsize for ds in datasets}
        self._per_token = {ds.name for ds in datasets if ds.per_token}
        self._fd = os.open(path, os.O_RDWR)

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            self.close()
        except JobError:
            if exc_type is None:
                raise  # otherwise the error already on its way says what happened

    def write(self, rows: np.ndarray, values: Mapping[str, np.ndarray]) -> None:
        """Write the rows' values (per-token values concatenated in `rows` order), rounded once to the
        storage dtype; make them durable, then mark the rows done."""
        for name, array in values.items():
            array = np.ascontiguousarray(array, dtype=self._dtypes[name])
            starts, counts = self._dataset_rows(name, rows)
            if counts.sum() != len(array):
                raise ValueError(f"{name}: {len(array)} rows of values for {counts.sum()} dataset rows")
            ends = np.cumsum(counts)
            for start, end, count in zip(starts, ends, counts):
                position = self._offsets[name] + int(start) * self._row_bytes[name]
                self._pwrite_all(array[end - count : end].data, position)
        self._io(os.fdatasync)
        for row in rows:
            self._pwrite_all(memoryview(b"\x01"), self._done_offset + int(row))
        self.done[rows] = 1

    def _dataset_rows(self, name: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each record's rows start in dataset `name`, and how many it has."""
        if name not in self._per_token:
            return rows, np.ones(len(rows), dtype=np.int64)
        return self._token_offsets[rows], self._token_offsets[rows + 1] - self._token_offsets[rows]

    def _pwrite_all(self, data: memoryview, offset: int) -> None:
        """All of `data` at `offset`: a write cut short at a limit is continued, so that it fails for real."""
        data = data.cast("B")
        while data:
            written = self._io(os.pwrite, data, offset)
            data, offset = data[written:], offset + written

    def _io(self, call, *args):
        """`call(fd, *args)`, with a failure (ENOSPC, EFBIG, EIO) told as what it means for the job."""
        try:
            return call(self._fd, *args)
        except OSError as err:
            raise JobError(f"{self.path}: cannot write rows ({err.strerror}); every row marked done so far is "
                           f"kept; free space (or raise the file-size limit) and rerun the same command to "
                           f"resume") from None

    def close(self) -> None:
        """Make the last done flags durable and let go of the file."""
        try:
            self._io(os.fsync)
        finally:
            os.close(self._fd)
