"""Reading FASTA: plain or gzip, validated against the model's alphabet and normalised as users write it, a block
of records at a time.

The parser works on blocks of whole records with numpy and bytes operations, so that tens of millions of
short records take seconds and never become one Python object each. Accepted: lowercase, CRLF (or CR)
line ends, blank lines, wrapped or single-line sequences, whitespace inside sequence lines, a terminal
'*', headers whose description is any text (the id must be UTF-8), a UTF-8 byte-order mark. The id is the header's first word.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Sequence

import numpy as np

from extract.errors import UserError

GZIP_MAGIC = b"\x1f\x8b"
BLOCK_BYTES = 8 << 20
WHITESPACE = bytes(c for c in range(128) if chr(c).isspace())  # where str.split() splits, in ASCII
MARK, STOP, NEWLINE, INVALID = b">", b"*", b"\n", b"\0"
UTF8_BOM = b"\xef\xbb\xbf"  # what some editors put before UTF-8 text


class Alphabet:
    """The residue letters a model reads (upper case, as its contract's `alphabet`) and how messages name them
    (its `alphabet_name`), with the byte table that normalises a sequence to them, built once."""

    def __init__(self, letters: frozenset[str], name: str):
        self.letters = letters
        self.name = name
        self.normalising_table = _normalising_table(letters)


def _normalising_table(letters: frozenset[str]) -> bytes:
    """Residues (either case) become uppercase, record marks and stops stay, anything else INVALID."""
    table = bytearray(INVALID * 256)
    for letter in letters:
        table[ord(letter)] = table[ord(letter.lower())] = ord(letter)
    for kept in MARK + STOP:
        table[kept] = kept
    return bytes(table)


IS_WHITESPACE = np.zeros(256, bool)
IS_WHITESPACE[list(WHITESPACE)] = True


@dataclass(frozen=True)
class RecordBlock:
    """Consecutive records of one file, as compact arrays."""

    path: Path
    first_number: int  # 1-based number of the block's first record in its file
    ids: bytes  # every record's id (UTF-8), each followed by a newline
    sequences: bytes  # every record's normalised sequence, each after a '>'
    lengths: np.ndarray  # int64: residues of each record

    def __len__(self) -> int:
        return len(self.lengths)


def record_where(path: str | Path, number: int, record_id: str) -> str:
    return f"{path}: record {number} ({record_id})"


def sequence_problem(sequence: str, alphabet: Alphabet) -> str | None:
    """What makes a record's sequence (as written, whitespace removed) no sequence of `alphabet`; None if it is one."""
    if sequence.endswith("*"):
        sequence = sequence[:-1]
    if not sequence:
        return "the record has no sequence"
    bad = {char.upper() if char.isascii() else char for char in sequence
           if not char.isascii() or char.upper() not in alphabet.letters}
    if bad:
        return f"character(s) {''.join(sorted(bad))!r} not in {alphabet.name}"
    return None


def read_blocks(paths: Sequence[str | Path], alphabet: Alphabet,
                block_bytes: int = BLOCK_BYTES) -> Iterator[RecordBlock]:
    """Validated, normalised records of every file in the order given, in blocks of about `block_bytes`
    of input (or one record, where that is longer); UserError on bad input."""
    for path in map(Path, paths):
        _check_is_a_file(path)
        try:
            yield from _file_blocks(path, alphabet, block_bytes)
        except (EOFError, zlib.error, gzip.BadGzipFile) as err:
            raise UserError(f"{path}: the gzip stream is truncated or corrupt ({err})") from None
        except OSError as err:
            raise UserError(f"{path}: cannot read it ({err.strerror or err})") from None


def _check_is_a_file(path: Path) -> None:
    """A regular file, read twice if need be (a resumed job reads its inputs again): not a pipe or device."""
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a FASTA file")
    if not path.is_file():
        raise UserError(f"{path}: not a regular file (a pipe or a device); save the FASTA to a file first")


def _open_binary(path: Path) -> BinaryIO:
    with open(path, "rb") as raw:
        magic = raw.read(2)
    return gzip.open(path, "rb") if magic == GZIP_MAGIC else open(path, "rb")


def _chunks(path: Path, block_bytes: int) -> Iterator[bytes]:
    with _open_binary(path) as handle:
        while chunk := handle.read(block_bytes):
            yield chunk


def _whole_records(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Re-cut a byte stream so that every piece but the first starts at a line that starts with '>'."""
    pending: list[bytes] = []
    for chunk in chunks:
        after_newline = chunk.rfind(b"\n>")
        cut = max(after_newline, chunk.rfind(b"\r>", max(after_newline, 0))) + 1
        if cut:
            yield b"".join([*pending, chunk[:cut]])
            pending = [chunk[cut:]]
        else:
            pending.append(chunk)
    if any(pending):
        yield b"".join(pending)


def _file_blocks(path: Path, alphabet: Alphabet, block_bytes: int) -> Iterator[RecordBlock]:
    number = 1
    started = False
    for data in _whole_records(_chunks(path, block_bytes)):
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not started:
            data = data.removeprefix(UTF8_BOM)
            body = data.lstrip(WHITESPACE)
            if not body:
                continue
            indent = data[: len(data) - len(body)]
            if not body.startswith(MARK) or (indent and not indent.endswith(NEWLINE)):
                raise UserError(f"{path}: not a FASTA file (the first line does not start with '>')")
            data, started = body, True
        block = _parse_block(path, alphabet, number, data)
        number += len(block)
        yield block
    if not started:
        raise UserError(f"{path}: the file is empty")


def _parse_block(path: Path, alphabet: Alphabet, first_number: int, data: bytes) -> RecordBlock:
    """Records of `data`, which starts with '>' and has line ends normalised to newlines."""
    raw = np.frombuffer(data, np.uint8)
    marks = np.flatnonzero(raw == ord(MARK))
    at_line_start = (marks == 0) | (raw[marks - 1] == ord(NEWLINE))
    starts = marks[at_line_start]
    newlines = np.append(np.flatnonzero(raw == ord(NEWLINE)), len(raw))
    header_ends = newlines[np.searchsorted(newlines, starts)]
    ids, no_id = _ids(data, raw, starts, header_ends)
    sequences, lengths, bad = _sequences(raw, marks[~at_line_start], starts, header_ends, alphabet.normalising_table)
    problems = np.union1d(no_id, bad)
    if problems.size:
        _explain(path, alphabet, first_number, data, starts, header_ends, ids, int(problems[0]))
    return RecordBlock(path, first_number, ids, sequences, lengths)


def _ids(data: bytes, raw: np.ndarray, starts: np.ndarray, header_ends: np.ndarray) -> tuple[bytes, np.ndarray]:
    """The ids as one newline-separated blob, and the records whose header has none."""
    word_ends = np.append(np.flatnonzero(raw <= ord(" ")), len(raw))
    id_ends = word_ends[np.searchsorted(word_ends, starts + 1)]
    id_lengths = id_ends - starts - 1
    unusual = id_lengths == 0  # "> id" or no id at all
    stops = id_ends < len(raw)
    unusual[stops] |= ~IS_WHITESPACE[raw[id_ends[stops]]]  # e.g. a control character inside the id
    if not data.isascii():
        high = np.flatnonzero(raw >= 0x80)
        unusual |= np.searchsorted(high, starts + 1) < np.searchsorted(high, id_ends)
    if unusual.any():  # split as Python splits text: Unicode whitespace, a leading space
        words = [_first_word(data[s + 1 : e]) if odd else data[s + 1 : i]
                 for s, e, i, odd in zip(starts.tolist(), header_ends.tolist(), id_ends.tolist(), unusual.tolist())]
        no_usable_id = np.flatnonzero([not word or not _is_utf8(word) for word in words])
        return b"".join(word + NEWLINE for word in words), no_usable_id
    ends_out = np.cumsum(id_lengths + 1)
    source = np.repeat(starts + 1 - (ends_out - id_lengths - 1), id_lengths + 1) + np.arange(ends_out[-1])
    blob = raw[source]
    blob[ends_out - 1] = ord(NEWLINE)
    return blob.tobytes(), np.empty(0, np.int64)


def _sequences(raw: np.ndarray, inner_marks: np.ndarray, starts: np.ndarray, header_ends: np.ndarray,
               normalising_table: bytes) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Normalised sequences (each after a '>'), residues per record and the records that are no sequence of the
    alphabet."""
    runs = np.empty(2 * len(starts) + 1, np.int64)  # kept: each '>' and the sequence lines; dropped: headers
    runs[0:-1:2] = np.append(starts[0], starts[1:] - header_ends[:-1]) + 1
    runs[1::2] = header_ends - starts - 1
    runs[-1] = len(raw) - header_ends[-1]
    kept = np.repeat(np.arange(len(runs)) % 2 == 0, runs)
    sequence_marks = inner_marks[kept[inner_marks]]  # a '>' inside a sequence line is no residue
    if sequence_marks.size:
        raw = raw.copy()
        raw[sequence_marks] = ord(INVALID)
    stream = raw[kept].tobytes().translate(normalising_table, WHITESPACE)
    if STOP in stream:
        stream = _without_terminal_stops(stream)
    record_marks = np.flatnonzero(np.frombuffer(stream, np.uint8) == ord(MARK))
    lengths = np.diff(np.append(record_marks, len(stream))) - 1
    bad = np.flatnonzero(lengths == 0)
    if INVALID in stream or STOP in stream:
        view = np.frombuffer(stream, np.uint8)
        wrong = np.flatnonzero((view == ord(INVALID)) | (view == ord(STOP)))
        bad = np.union1d(bad, np.searchsorted(record_marks, wrong, side="right") - 1)
    return stream, lengths, bad


def _without_terminal_stops(stream: bytes) -> bytes:
    """Drop each '*' that ends a record (it is followed by the next record's '>' or ends the block)."""
    view = np.frombuffer(stream + MARK, np.uint8)
    stops = np.flatnonzero(view == ord(STOP))
    return np.delete(view[:-1], stops[view[stops + 1] == ord(MARK)]).tobytes()


def _first_word(header: bytes) -> bytes:
    """The header's id (empty without one), in UTF-8. A description need not be UTF-8, the id must: one
    that is not comes back as its bytes, for `_explain` to refuse."""
    try:
        return "".join(header.decode().split()[:1]).encode()
    except UnicodeDecodeError:
        return b"".join(header.split()[:1])


def _is_utf8(text: bytes) -> bool:
    try:
        text.decode()
    except UnicodeDecodeError:
        return False
    return True


def _explain(path: Path, alphabet: Alphabet, first_number: int, data: bytes, starts: np.ndarray,
             header_ends: np.ndarray, ids: bytes, record: int) -> None:
    """Raise the UserError for `record`, a record of the block that the fast checks refused."""
    number = first_number + record
    record_id = ids.split(NEWLINE)[record]
    if not record_id:
        raise UserError(f"{path}: record {number}: the header has no id")
    if not _is_utf8(record_id):
        raise UserError(f"{path}: record {number}: the id is not UTF-8 text")
    where = record_where(path, number, record_id.decode())
    end = int(starts[record + 1]) if record + 1 < len(starts) else len(data)
    sequence = data[int(header_ends[record]) : end].translate(None, WHITESPACE)
    if not _is_utf8(sequence):
        raise UserError(f"{where}: the sequence is not UTF-8 text (a byte outside {alphabet.name})")
    problem = sequence_problem(sequence.decode(), alphabet)
    assert problem, f"record {number} of {path} was refused but is a sequence of {alphabet.name}"
    raise UserError(f"{where}: {problem}")


@dataclass(frozen=True)
class Records:
    """Every record, in input order, as Python lists: for checking outputs and for tests. The job keeps
    its input in the compact input index (extract/data/input_index.py) instead."""

    ids: list[str]
    sequences: list[str]
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def read_inputs(paths: Sequence[str | Path], alphabet: Alphabet) -> Records:
    ids: list[str] = []
    sequences: list[str] = []
    for block in read_blocks(paths, alphabet):
        ids += block.ids.decode().split("\n")[:-1]
        sequences += block.sequences.decode().split(">")[1:]
    return Records(ids, sequences, np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences)))
