"""The input index: what the job needs to know of every record, read and validated once, on rank 0.

Per row it holds compact arrays, never a Python object: the residues, and the first row that holds the
same normalised sequence (so that identical sequences are computed once). Rank 0 builds it in one pass
over the inputs and saves it next to the output, in OUT.h5.inputs/: the normalised sequences (so gzip
inputs are decompressed once), the arrays, the ids, and a manifest with the inputs' sizes and
modification times and the alphabet they were read with. Every rank then reads only its own sequences from
there, and a resumed job whose inputs and model's alphabet have not changed reuses the index without reading
them again. The job removes it when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np

from extract.data import fasta
from extract.output.durability import sync
from extract.errors import JobError, UserError

FORMAT = "esm-features input index 1"
MANIFEST, SEQUENCES, LENGTHS, REPRESENTATIVES, IDS = (
    "manifest.json", "sequences.bin", "lengths.npy", "representatives.npy", "ids.bin")
ID_HASH_BASE = np.uint64(0x100000001B3)  # any odd number: ids that share a hash are compared in full


def directory_for(out: Path) -> Path:
    return out.with_name(out.name + ".inputs")


class IdList:
    """`count` ids held as one blob of newline-terminated UTF-8, or in a file of that blob read when first
    needed; an int gives one id, a slice a list of them."""

    def __init__(self, source: bytes | Path, count: int):
        self._source = source
        self._count = count

    @cached_property
    def blob(self) -> bytes:
        return self._source.read_bytes() if isinstance(self._source, Path) else self._source

    @cached_property
    def _ends(self) -> np.ndarray:
        return np.flatnonzero(np.frombuffer(self.blob, np.uint8) == ord(fasta.NEWLINE))

    def __len__(self) -> int:
        return self._count

    def _start(self, row: int) -> int:
        return 0 if row == 0 else int(self._ends[row - 1]) + 1

    def __getitem__(self, item: int | slice) -> str | list[str]:
        if isinstance(item, slice):
            start, stop, _ = item.indices(len(self))
            if start >= stop:
                return []
            return self.blob[self._start(start) : int(self._ends[stop - 1])].decode().split("\n")
        return self.blob[self._start(item) : int(self._ends[item])].decode()


@dataclass(frozen=True)
class InputIndex:
    lengths: np.ndarray  # int64: residues of each row
    representatives: np.ndarray  # int64: the first row that holds the same normalised sequence
    ids: IdList
    id_bytes: int  # UTF-8 bytes of all ids together
    digest: str  # sha256 over every id and sequence, in input order
    directory: Path | None  # where it is saved with the sequences; None when it is held in memory only

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def distinct(self) -> int:
        return int(np.count_nonzero(self.representatives == np.arange(len(self))))

    def sequences(self) -> "SequenceStore":
        return SequenceStore(self.directory / SEQUENCES, self.lengths)


class SequenceStore:
    """Normalised sequences by row, read with positioned reads from the saved index."""

    def __init__(self, path: Path, lengths: np.ndarray):
        self._starts = np.cumsum(lengths + 1) - lengths  # each sequence follows a '>'
        self._lengths = lengths
        self._path = path
        self._fd = os.open(path, os.O_RDONLY)

    def fetch(self, rows: np.ndarray) -> list[str]:
        """The rows' sequences; JobError if the file cannot be read or no longer holds them all."""
        lengths = self._lengths[rows].tolist()
        try:
            chunks = [os.pread(self._fd, length, start) for start, length in zip(self._starts[rows].tolist(), lengths)]
        except OSError as err:
            raise JobError(f"{self._path}: cannot read the input index ({err.strerror}); "
                           f"rerun the same command to resume") from None
        if sum(map(len, chunks)) != sum(lengths):
            raise JobError(f"{self._path}: ends before the sequences it should hold; the input index is damaged; "
                           f"rerun the same command to resume (it reads the inputs again)")
        return [chunk.decode() for chunk in chunks]

    def __enter__(self) -> "SequenceStore":
        return self

    def __exit__(self, *exc) -> None:
        os.close(self._fd)


def _input_stats(paths: Sequence[Path]) -> list[list] | None:
    try:
        return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in map(Path, paths)]
    except OSError:
        return None


def load(directory: Path) -> InputIndex:
    """The index rank 0 saved; every rank maps its arrays rather than reading them into memory."""
    manifest = json.loads((directory / MANIFEST).read_text())
    lengths, representatives = (np.load(directory / name, mmap_mode="r") for name in (LENGTHS, REPRESENTATIVES))
    return InputIndex(lengths, representatives, IdList(directory / IDS, manifest["rows"]), manifest["id_bytes"],
                      manifest["digest"], directory)


def saved_if_current(paths: Sequence[Path], alphabet: fasta.Alphabet, directory: Path) -> InputIndex | None:
    """The index saved in `directory` if it was built from `paths` as they are now (same sizes and
    modification times), read with `alphabet`, and holds all their sequences, else None."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        if (manifest["format"] == FORMAT and manifest["inputs"] == _input_stats(paths)
                and manifest["alphabet"] == _letters(alphabet)):
            index = load(directory)
            if (directory / SEQUENCES).stat().st_size == int((index.lengths + 1).sum()):  # '>' before each
                return index
    except (OSError, ValueError, KeyError):
        pass
    return None


def prepare(paths: Sequence[Path], alphabet: fasta.Alphabet, directory: Path) -> bool:
    """On rank 0: make sure `directory` holds the index of `paths` read with `alphabet`; returns whether a saved
    one was reused."""
    if saved_if_current(paths, alphabet, directory):
        return True
    building = directory.with_name(directory.name + ".building")
    try:
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir()
        build(paths, alphabet, building)
        for saved in (*building.iterdir(), building):  # durable before a resumed job trusts it
            sync(saved)
        shutil.rmtree(directory, ignore_errors=True)
        building.rename(directory)
        sync(directory.parent)
    except OSError as err:
        raise UserError(f"{directory}: cannot write the input index ({err.strerror or err})") from None
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return False


def remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


class _Reading:
    """What one pass over the inputs gathers, block by block."""

    def __init__(self):
        self.lengths: list[np.ndarray] = []
        self.digests: list[bytes] = []
        self.ids: list[bytes] = []
        self.id_hashes: list[np.ndarray] = []
        self.file_starts: list[tuple[Path, int]] = []  # each file's path and first row
        self.rows = 0

    def add(self, block: fasta.RecordBlock) -> None:
        if block.first_number == 1:
            self.file_starts.append((block.path, self.rows))
        self.lengths.append(block.lengths)
        self.digests.append(_sequence_digests(block))
        self.ids.append(block.ids)
        self.id_hashes.append(_id_hashes(block.ids))
        self.rows += len(block)


def build(paths: Sequence[Path], alphabet: fasta.Alphabet, directory: Path | None) -> InputIndex:
    """Read and validate every input once against `alphabet`; with a `directory`, save the index there."""
    reading = _Reading()
    with open(directory / SEQUENCES if directory else os.devnull, "wb") as store:
        for block in fasta.read_blocks(paths, alphabet):
            reading.add(block)
            store.write(block.sequences)
    ids = IdList(b"".join(reading.ids), reading.rows)
    _refuse_duplicate_ids(ids, np.concatenate(reading.id_hashes), reading.file_starts)
    digests = b"".join(reading.digests)
    digest = hashlib.sha256(hashlib.sha256(ids.blob).digest() + hashlib.sha256(digests).digest()).hexdigest()
    index = InputIndex(np.concatenate(reading.lengths), _representatives(digests), ids,
                       len(ids.blob) - reading.rows, digest, directory)
    if directory:
        _save(index, paths, alphabet)
    return index


def _letters(alphabet: fasta.Alphabet) -> str:
    return "".join(sorted(alphabet.letters))


def _save(index: InputIndex, paths: Sequence[Path], alphabet: fasta.Alphabet) -> None:
    directory = index.directory
    np.save(directory / LENGTHS, index.lengths)
    np.save(directory / REPRESENTATIVES, index.representatives)
    (directory / IDS).write_bytes(index.ids.blob)
    manifest = {"format": FORMAT, "inputs": _input_stats(paths), "alphabet": _letters(alphabet),
                "digest": index.digest, "rows": len(index), "id_bytes": index.id_bytes}
    (directory / MANIFEST).write_text(json.dumps(manifest))


def _sequence_digests(block: fasta.RecordBlock) -> bytes:
    """A 16-byte blake2b digest of each record's normalised sequence."""
    view = memoryview(block.sequences)
    ends = np.cumsum(block.lengths + 1)
    blake2b = hashlib.blake2b
    return b"".join([blake2b(view[a:b], digest_size=16).digest()
                     for a, b in zip((ends - block.lengths).tolist(), ends.tolist())])


def _id_hashes(ids: bytes) -> np.ndarray:
    """A 64-bit polynomial hash of each newline-terminated id, computed for all ids at once."""
    raw = np.frombuffer(ids, np.uint8)
    ends = np.flatnonzero(raw == ord(fasta.NEWLINE)) + 1
    starts = ends - np.diff(ends, prepend=0)
    position = np.arange(len(raw)) - np.repeat(starts, ends - starts)
    powers = np.cumprod(np.append(np.uint64(1), np.full(int(position.max()), ID_HASH_BASE)))  # mod 2**64
    return np.add.reduceat(raw * powers[position], starts)


def _refuse_duplicate_ids(ids: IdList, hashes: np.ndarray, file_starts: list[tuple[Path, int]]) -> None:
    """UserError naming the first row whose id an earlier row has, and that earlier row."""
    order = np.argsort(hashes)
    shared = hashes[order[1:]] == hashes[order[:-1]]
    if not shared.any():
        return
    first_seen: dict[str, int] = {}
    for row in np.union1d(order[1:][shared], order[:-1][shared]).tolist():
        earlier = first_seen.setdefault(ids[row], row)
        if earlier != row:
            raise UserError(f"{_where(row, ids, file_starts)}: duplicate id, "
                            f"first seen at {_where(earlier, ids, file_starts)}")


def _where(row: int, ids: IdList, file_starts: list[tuple[Path, int]]) -> str:
    path, first = next((p, f) for p, f in reversed(file_starts) if f <= row)
    return fasta.record_where(path, row - first + 1, ids[row])


def _representatives(digests: bytes) -> np.ndarray:
    """For each row, the first row whose sequence has the same digest."""
    keys = np.frombuffer(digests, np.uint64).reshape(-1, 2)
    order = np.argsort(keys[:, 0])
    ordered = keys[order]
    if np.any((ordered[1:, 0] == ordered[:-1, 0]) & (ordered[1:, 1] != ordered[:-1, 1])):
        order = np.lexsort((keys[:, 1], keys[:, 0]))  # first halves alone do not group them: sort by both
        ordered = keys[order]
    starts = np.flatnonzero(np.append(True, (ordered[1:] != ordered[:-1]).any(axis=1)))
    del ordered
    representatives = np.empty(len(order), np.int64)
    representatives[order] = np.repeat(np.minimum.reduceat(order, starts), np.diff(np.append(starts, len(order))))
    return representatives
