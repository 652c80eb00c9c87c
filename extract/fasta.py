"""Reading protein FASTA: plain or gzip, streamed, validated, normalised as users write it."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, TextIO

import numpy as np
from Bio.SeqIO.FastaIO import SimpleFastaParser
from esm.constants import proteinseq_toks

from extract.errors import UserError

# Residue letters of the ESM-2 alphabet; the gap symbols '-' and '.' mean an alignment, not a protein.
RESIDUES = frozenset(tok for tok in proteinseq_toks["toks"] if tok.isalpha())
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class ProteinRecord:
    path: str
    number: int  # 1-based position of the record in its file
    id: str
    sequence: str

    @property
    def where(self) -> str:
        return f"{self.path}: record {self.number} ({self.id})"


@dataclass(frozen=True)
class ProteinInputs:
    """Every record of the input, in input order."""

    ids: list[str]
    sequences: list[str]
    lengths: np.ndarray
    digest: str  # sha256 over files' ids and sequences in order

    def __len__(self) -> int:
        return len(self.ids)


def _open_text(path: Path) -> TextIO:
    with open(path, "rb") as raw:
        magic = raw.read(2)
    if magic == GZIP_MAGIC:
        return gzip.open(path, "rt", encoding="utf-8", newline=None)
    return open(path, "rt", encoding="utf-8", newline=None)


def _normalise(record: ProteinRecord) -> str:
    seq = record.sequence.upper()
    if seq.endswith("*"):
        seq = seq[:-1]
    if not seq:
        raise UserError(f"{record.where}: the record has no sequence")
    bad = set(seq) - RESIDUES
    if bad:
        shown = "".join(sorted(bad))
        raise UserError(f"{record.where}: character(s) {shown!r} not in the ESM-2 protein alphabet")
    return seq


def _records(path: Path) -> Iterator[ProteinRecord]:
    with _open_text(path) as handle:
        lines = (line for line in handle if line.strip())
        first = next(lines, None)
        if first is None:
            raise UserError(f"{path}: the file is empty")
        if not first.startswith(">"):
            raise UserError(f"{path}: not a FASTA file (the first line does not start with '>')")
        for number, (title, sequence) in enumerate(SimpleFastaParser(itertools.chain([first], lines)), 1):
            words = title.split()
            if not words:
                raise UserError(f"{path}: record {number}: the header has no id")
            yield ProteinRecord(str(path), number, words[0], sequence)


def read_proteins(paths: Sequence[str | Path]) -> Iterator[ProteinRecord]:
    """Validated, normalised records of every file in the order given; UserError on bad input."""
    for path in map(Path, paths):
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        try:
            for record in _records(path):
                yield ProteinRecord(record.path, record.number, record.id, _normalise(record))
        except (EOFError, zlib.error, gzip.BadGzipFile) as err:
            raise UserError(f"{path}: the gzip stream is truncated or corrupt ({err})") from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not a FASTA file (not UTF-8 text)") from None


def read_inputs(paths: Sequence[str | Path]) -> ProteinInputs:
    ids: list[str] = []
    sequences: list[str] = []
    first_seen: dict[str, str] = {}
    digest = hashlib.sha256()
    for record in read_proteins(paths):
        if record.id in first_seen:
            raise UserError(f"{record.where}: duplicate id, first seen at {first_seen[record.id]}")
        first_seen[record.id] = record.where
        ids.append(record.id)
        sequences.append(record.sequence)
        digest.update(f">{record.id}\n{record.sequence}\n".encode())
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    return ProteinInputs(ids, sequences, lengths, digest.hexdigest())
