"""fair-esm's files from an esm-features output: one `<id>.pt` per protein, as fair-esm's extract writes them.

    python extract/export.py OUT.h5 --fair-esm-dir DIR
    esm-features-export OUT.h5 --fair-esm-dir DIR        # the same, where the package is installed

Each file is `torch.save` of fair-esm's dict: `label` (the protein's id), then, as far as OUT.h5 holds them,
`representations` (per-residue rows, with --include per_tok), `mean_representations` and
`bos_representations`, each {layer number: float32 tensor}. As in fair-esm's extract, a `/` in an id
puts its file in a subdirectory (`DIR/read7/1.pt` for `read7/1`); an id that would name a file outside DIR
(a part between slashes that is empty, `.` or `..`) or too long a name is refused before anything is written.
Proteins are read and written a slice at a time, so memory does not grow with their number; an existing
file of the same name is replaced, each one atomically. Refuses an output whose job has not finished.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator, TextIO

if __package__ in (None, ""):  # started as a script: make the `extract` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from extract.engine.progress import BAR_SECONDS, Snapshot, bar, status_line  # noqa: E402
from extract.errors import JobError, UserError  # noqa: E402
from extract.output import hdf5_file  # noqa: E402

ROWS_PER_READ = 1024
# Our datasets' groups and fair-esm's keys, in the order fair-esm's extract puts them in its dict.
FAIR_ESM_KEYS = {hdf5_file.PER_TOKEN_GROUP: "representations", "mean": "mean_representations",
                 "bos": "bos_representations"}
SUFFIX = ".pt"


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="export", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a complete esm-features output (.h5)")
    parser.add_argument("--fair-esm-dir", required=True, type=Path,
                        help="the directory to write one <id>.pt per protein into (created if missing)")
    parser.add_argument("--progress-seconds", type=float, default=30.0,
                        help="seconds between progress lines (default: 30; a bar on a terminal)")
    return parser


def file_path(protein: str) -> str:
    """Where in the directory fair-esm's extract writes a protein's file (a `/` in its label names a subdirectory)."""
    return protein + SUFFIX


def _id_slices(ids: h5py.Dataset) -> Iterator[tuple[int, list[str]]]:
    for start in range(0, len(ids), ROWS_PER_READ):
        yield start, list(ids.asstr()[start : start + ROWS_PER_READ])


def _opened(path: Path) -> h5py.File:
    """The output, read-only; UserError unless it is a complete esm-features output."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as err:
        raise UserError(f"{path}: not a readable HDF5 file ({err})") from None
    try:
        hdf5_file.require_ours(path, f.attrs)
        if f.attrs["status"] != hdf5_file.COMPLETE:
            raise UserError(f"{path}: the job that writes it has not finished (status {f.attrs['status']!r}); "
                            f"rerun it to complete the output, then export")
    except BaseException:
        f.close()
        raise
    return f


def _stored(f: h5py.File) -> dict[str, list[int]]:
    """{our group: its layers}, for what the file holds: groups in fair-esm's key order, layers ascending
    (the order of fair-esm's forward)."""
    layers = sorted(json.loads(f.attrs["repr_layers"]))
    return {group: layers for group in FAIR_ESM_KEYS if group in f}


def _file_path_problem(protein: str, longest: int) -> str | None:
    parts = file_path(protein).split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "the id would name a file outside --fair-esm-dir (a part between slashes is empty, '.' or '..')"
    if max(len(os.fsencode(part)) for part in parts) > longest:
        return f"the id is too long to name a file (at most {longest} bytes between slashes, {SUFFIX} included)"
    return None


def _check_file_paths(path: Path, ids: h5py.Dataset, directory: Path) -> None:
    """Refuse, before writing anything, an id that cannot name a file in `directory`."""
    longest = os.pathconf(directory, "PC_NAME_MAX")
    for start, block in _id_slices(ids):
        for row, protein in enumerate(block, start + 1):
            problem = _file_path_problem(protein, longest)
            if problem:
                shown = protein if len(protein) <= 60 else f"{protein[:60]}..."
                raise UserError(f"{path}: row {row} ({shown}): {problem}; nothing exported")


def _prepared(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"--fair-esm-dir {directory}: exists and is not a directory") from None
    except OSError as err:
        raise UserError(f"--fair-esm-dir {directory}: cannot create it ({err.strerror or err})") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UserError(f"--fair-esm-dir {directory}: not writable")


def _tensor(values: np.ndarray) -> torch.Tensor:
    """A float32 tensor owning exactly these values (a view would save its whole block, as fair-esm's
    extract clones for)."""
    return torch.from_numpy(np.array(values, dtype=np.float32, order="C", copy=True))


def _save(result: dict, target: Path) -> None:
    """Under a temporary name, then renamed: an interrupted export leaves no truncated `.pt`. Serialised in
    memory first, so that a full disk is an OSError of the write (torch.save's own writer raises
    RuntimeError)."""
    serialised = io.BytesIO()
    torch.save(result, serialised)
    partial = target.with_name(target.name + ".partial")
    try:
        with open(partial, "wb") as out:
            out.write(serialised.getbuffer())
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


class _Progress:
    """Rows and residues exported, on `stream`: a line every `interval` seconds, or a bar on a terminal."""

    def __init__(self, total_rows: int, total_residues: int, interval: float, stream: TextIO):
        self._totals = (total_rows, total_residues)
        self._rows = self._residues = 0
        self._stream = stream
        self._as_bar = stream.isatty()
        self._interval = min(interval, BAR_SECONDS) if self._as_bar else interval
        self._started = self._reported_at = time.monotonic()

    def advance(self, rows: int, residues: int) -> None:
        self._rows += rows
        self._residues += residues
        if time.monotonic() - self._reported_at >= self._interval:
            self._report()

    def _report(self) -> None:
        self._reported_at = time.monotonic()
        elapsed = self._reported_at - self._started
        snapshot = Snapshot(self._rows, self._totals[0], self._residues, self._totals[1],
                            self._residues / elapsed if elapsed > 0 else 0.0)
        if self._as_bar:
            self._stream.write(f"\r{bar(snapshot)}")
        else:
            self._stream.write(f"{time.strftime('%H:%M:%S')} export: {status_line(snapshot)}\n")
        self._stream.flush()

    def finish(self) -> None:
        if self._as_bar:
            self._report()
            self._stream.write("\n")
            self._stream.flush()


def _total_residues(lengths: h5py.Dataset) -> int:
    return sum(int(lengths[start : start + ROWS_PER_READ].sum()) for start in range(0, len(lengths), ROWS_PER_READ))


def _export_slice(f: h5py.File, stored: dict[str, list[int]], start: int, block: list[str], directory: Path) -> None:
    stop = start + len(block)
    pooled = {group: {layer: f[f"{group}/layer_{layer}"][start:stop] for layer in layers}
              for group, layers in stored.items() if group != hdf5_file.PER_TOKEN_GROUP}
    offsets = f[hdf5_file.TOKEN_OFFSETS][start : stop + 1] if hdf5_file.PER_TOKEN_GROUP in stored else None
    for i, protein in enumerate(block):
        result: dict = {"label": protein}
        for group, layers in stored.items():
            if group == hdf5_file.PER_TOKEN_GROUP:
                rows = slice(offsets[i], offsets[i + 1])
                values = {layer: _tensor(f[f"{group}/layer_{layer}"][rows]) for layer in layers}
            else:
                values = {layer: _tensor(pooled[group][layer][i]) for layer in layers}
            result[FAIR_ESM_KEYS[group]] = values
        target = directory / file_path(protein)
        try:
            if "/" in protein:  # as fair-esm's extract, which makes the label's parent directories
                target.parent.mkdir(parents=True, exist_ok=True)
            _save(result, target)
        except OSError as err:
            raise JobError(f"{target}: cannot write it ({err.strerror or err}); the {start + i} files before it are "
                           f"complete; rerun the export once that is fixed") from None


def run(args: argparse.Namespace, stream: TextIO | None = None) -> int:
    """Write every protein's file, progress on `stream` (default stderr); returns how many. UserError for
    an output that cannot be exported, JobError for a write that failed."""
    if not args.progress_seconds > 0:
        raise UserError(f"--progress-seconds {args.progress_seconds}: give a positive number of seconds")
    with _opened(args.out) as f:
        ids = f["ids"]
        _prepared(args.fair_esm_dir)
        _check_file_paths(args.out, ids, args.fair_esm_dir)
        stored = _stored(f)
        progress = _Progress(len(ids), _total_residues(f["lengths"]), args.progress_seconds,
                             stream or sys.stderr)
        for start, block in _id_slices(ids):
            _export_slice(f, stored, start, block, args.fair_esm_dir)
            progress.advance(len(block), int(f["lengths"][start : start + len(block)].sum()))
        progress.finish()
        return len(ids)


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0 every file written, 2 bad usage or an output that cannot be exported, 1 a write failed."""
    args = create_parser().parse_args(argv)
    try:
        count = run(args)
    except (UserError, JobError) as err:
        sys.stderr.write(f"export: {err.prefix}{err}\n")
        return err.exit_code
    print(f"{args.out}: {count} proteins exported to {args.fair_esm_dir}, one <id>.pt each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
