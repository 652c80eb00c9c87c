"""Checking an output file: finished, every row done, finite numbers, and the FASTA's proteins in order.

    python extract/check_output.py OUT.h5 [--fasta F [F ...]]

Prints one line per problem found and exits 1 if there is any, 0 if the file is good; exits 2 when the
file cannot be checked at all (missing, not an esm-features output, bad FASTA), as for bad input
elsewhere. The file may be checked while a job still writes it: this never takes HDF5's file lock.
"""

from __future__ import annotations

import argparse
import string
import sys
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):  # started as a script: make the `extract` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from extract.output import hdf5_file  # noqa: E402
from extract.errors import UserError  # noqa: E402
from extract.data.fasta import Alphabet, read_inputs  # noqa: E402

# The FASTA is read only for its ids and lengths, whichever model made the file: every letter any model's
# alphabet may hold (ESM-2's protein letters, DNA's) is accepted.
ANY_LETTER = Alphabet(frozenset(string.ascii_uppercase), "the letters A to Z")
READ_BYTES = 64 << 20  # a dataset is scanned for NaN and inf in blocks of about this size
NAMED = 3  # ids named per problem


def _named(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:NAMED])
    return f"{shown}, ..." if len(ids) > NAMED else shown


def _float_datasets(f: h5py.File) -> list[h5py.Dataset]:
    found: list[h5py.Dataset] = []
    f.visititems(lambda _name, item: found.append(item)
                 if isinstance(item, h5py.Dataset) and item.dtype.kind == "f" else None)
    return found


def _rows_not_finite(dataset: h5py.Dataset) -> np.ndarray:
    """Rows (first index) of `dataset` holding NaN or inf, read block by block."""
    step = max(1, READ_BYTES // max(1, dataset.dtype.itemsize * int(np.prod(dataset.shape[1:]))))
    bad = [np.zeros(0, dtype=np.int64)]
    for start in range(0, dataset.shape[0], step):
        block = dataset[start:start + step]
        bad.append(start + np.flatnonzero(~np.isfinite(block.reshape(len(block), -1)).all(axis=1)))
    return np.concatenate(bad)


def _records_of(dataset: h5py.Dataset, f: h5py.File, records: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """Maps rows of `dataset` to the records they belong to; None for a dataset not made of records' rows."""
    if dataset.name.startswith(f"/{hdf5_file.PER_TOKEN_GROUP}/") and hdf5_file.TOKEN_OFFSETS in f:
        offsets = f[hdf5_file.TOKEN_OFFSETS][:]
        return lambda rows: np.searchsorted(offsets, rows, side="right") - 1
    return (lambda rows: rows) if dataset.shape[0] == records else None


def _non_finite_problems(f: h5py.File, ids: np.ndarray, done: np.ndarray) -> list[str]:
    """Datasets of records' rows are checked in the rows of done records (the others hold whatever the
    disk held); any other float dataset only once every record is done."""
    problems = []
    for dataset in _float_datasets(f):
        records_of = _records_of(dataset, f, len(ids))
        if records_of is None and not done.all():
            continue
        bad = _rows_not_finite(dataset)
        if records_of is None:
            if bad.size:
                problems.append(f"{dataset.name}: {bad.size} row(s) hold NaN or inf")
            continue
        records = np.unique(records_of(bad))
        records = records[done[records]]
        if records.size:
            problems.append(f"{dataset.name}: {records.size} record(s) hold NaN or inf "
                            f"({_named(list(ids[records]))})")
    return problems


def _fasta_problems(ids: np.ndarray, lengths: np.ndarray, fasta: list[Path]) -> list[str]:
    inputs = read_inputs(fasta, ANY_LETTER)
    if list(ids) == inputs.ids:
        differ = np.flatnonzero(lengths != inputs.lengths)
        if not differ.size:
            return []
        named = _named([f"{ids[r]}: {lengths[r]} in the file, {inputs.lengths[r]} in the FASTA" for r in differ])
        return [f"{differ.size} row(s) have another length than in the FASTA ({named})"]
    in_file = set(ids)
    in_fasta = set(inputs.ids)
    missing = [i for i in inputs.ids if i not in in_file]
    extra = [i for i in ids if i not in in_fasta]
    problems = [f"the file has {len(ids)} rows, the FASTA {len(inputs)} records"] if len(ids) != len(inputs) else []
    if missing:
        problems.append(f"{len(missing)} FASTA id(s) are not in the file ({_named(missing)})")
    if extra:
        problems.append(f"{len(extra)} id(s) in the file are not in the FASTA ({_named(extra)})")
    if not (missing or extra or problems):
        row = next(r for r, (a, b) in enumerate(zip(ids, inputs.ids)) if a != b)
        problems.append(f"the rows are not in the FASTA's order (row {row}: {ids[row]} in the file, "
                        f"{inputs.ids[row]} in the FASTA)")
    return problems


def find_problems(path: Path, fasta: list[Path] | None = None) -> list[str]:
    """Everything wrong with the output at `path`; UserError if it cannot be checked."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with h5py.File(path, "r", locking=False) as f:
            hdf5_file.require_ours(path, f.attrs)
            ids = f["ids"].asstr()[:]
            lengths = f["lengths"][:]
            done = f["done"][:].astype(bool)
            problems = [] if f.attrs["status"] == hdf5_file.COMPLETE else [
                f"status is {f.attrs['status']!r}: the job has not finished; rerun it to resume"]
            if not done.all():
                problems.append(f"{np.count_nonzero(~done)} of {done.size} rows are not done "
                                f"({_named(list(ids[~done]))})")
            problems += _non_finite_problems(f, ids, done)
    except OSError as err:
        raise UserError(f"{path}: not a readable HDF5 file ({err})") from None
    except KeyError as err:
        raise UserError(f"{path}: a damaged esm-features output ({err})") from None
    return problems + (_fasta_problems(ids, lengths, fasta) if fasta else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="an esm-features output (.h5)")
    parser.add_argument("--fasta", nargs="+", type=Path, help="the FASTA file(s) it was made from, in order")
    args = parser.parse_args(argv)
    try:
        problems = find_problems(args.out, args.fasta)
    except UserError as err:
        print(f"check_output: error: {err}", file=sys.stderr)
        return err.exit_code
    for problem in problems:
        print(f"{args.out}: {problem}")
    if problems:
        return 1
    print(f"{args.out}: OK: complete, every row done, all values finite"
          + (", the FASTA's ids in order" if args.fasta else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
