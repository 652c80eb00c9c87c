"""extract/check_output.py: what it finds wrong with an output, and its exit codes."""

import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from extract import check_output
from extract.data.fasta import read_inputs
from jobs import ESM2_ALPHABET, REPO, write_fasta


@pytest.fixture
def output(tmp_path, single_process_run):
    """A copy of a complete output, free to spoil."""
    return shutil.copy(single_process_run.out, tmp_path / "copy.h5")


def _check(capsys, *argv):
    code = check_output.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.strip()


def test_a_complete_output_of_the_fasta_passes(capsys, output, capsid_fasta):
    code, lines, err = _check(capsys, output, "--fasta", capsid_fasta)
    assert (code, err) == (0, "")
    assert lines == [f"{output}: OK: complete, every row done, all values finite, the FASTA's ids in order"]


def test_unfinished_rows_and_status_are_reported(capsys, output):
    with h5py.File(output, "r+") as f:
        f["done"][[3, 9]] = 0
        f.attrs["status"] = "incomplete"
        ids = f["ids"].asstr()[[3, 9]]
    code, lines, _ = _check(capsys, output)
    assert code == 1
    assert lines == [f"{output}: status is 'incomplete': the job has not finished; rerun it to resume",
                     f"{output}: 2 of 16 rows are not done ({ids[0]}, {ids[1]})"]


def test_nan_and_inf_in_done_records_are_reported(capsys, output):
    with h5py.File(output, "r+") as f:
        f["mean/layer_2"][5, 7] = np.nan
        f["mean/layer_2"][11, 0] = np.inf
        offsets = f["per_tok/offsets"][:]
        f["per_tok/layer_2"][offsets[3] + 1, 2] = np.nan
        f["per_tok/layer_2"][offsets[8], 0] = np.nan  # in a record not done: its rows mean nothing yet
        f["done"][8] = 0
        ids = f["ids"].asstr()[:]
    code, lines, _ = _check(capsys, output)
    assert code == 1
    assert lines == [f"{output}: 1 of 16 rows are not done ({ids[8]})",
                     f"{output}: /mean/layer_2: 2 record(s) hold NaN or inf ({ids[5]}, {ids[11]})",
                     f"{output}: /per_tok/layer_2: 1 record(s) hold NaN or inf ({ids[3]})"]


def test_ids_other_than_the_fastas_are_reported(capsys, tmp_path, output, capsid_fasta):
    inputs = read_inputs([capsid_fasta], ESM2_ALPHABET)
    records = list(zip(inputs.ids, inputs.sequences))
    swapped = write_fasta(tmp_path / "swapped.fasta", [records[1], records[0], *records[2:]])
    code, lines, _ = _check(capsys, output, "--fasta", swapped)
    assert code == 1
    assert lines == [f"{output}: the rows are not in the FASTA's order "
                     f"(row 0: {inputs.ids[0]} in the file, {inputs.ids[1]} in the FASTA)"]
    fewer = write_fasta(tmp_path / "fewer.fasta", records[:14] + [("new_protein", "MKV")])
    code, lines, _ = _check(capsys, output, "--fasta", fewer)
    assert code == 1
    assert lines == [f"{output}: the file has 16 rows, the FASTA 15 records",
                     f"{output}: 1 FASTA id(s) are not in the file (new_protein)",
                     f"{output}: 2 id(s) in the file are not in the FASTA ({inputs.ids[14]}, {inputs.ids[15]})"]


def test_files_that_cannot_be_checked_exit_2(capsys, tmp_path, output):
    not_hdf5 = tmp_path / "notes.h5"
    not_hdf5.write_text("not HDF5")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = [1]
    cases = {tmp_path / "absent.h5": "no such file", foreign: "exists and is not an esm-features output"}
    for path, problem in cases.items():
        assert _check(capsys, path) == (2, [], f"check_output: error: {path}: {problem}")
    code, lines, err = _check(capsys, not_hdf5)
    assert (code, lines) == (2, []) and err.startswith(f"check_output: error: {not_hdf5}: not a readable HDF5 file")
    damaged = shutil.copy(output, tmp_path / "damaged.h5")
    with h5py.File(damaged, "r+") as f:
        del f["lengths"]
    code, lines, err = _check(capsys, damaged)
    assert (code, lines) == (2, []) and err.startswith(f"check_output: error: {damaged}: a damaged esm-features output")
    code, lines, err = _check(capsys, output, "--fasta", not_hdf5)
    assert (code, lines, err) == (2, [], f"check_output: error: {not_hdf5}: not a FASTA file "
                                         f"(the first line does not start with '>')")


def test_the_script_runs_on_its_own(output):
    with h5py.File(output, "r+") as f:
        f["done"][0] = 0
        first = f["ids"].asstr()[0]
    done = subprocess.run([sys.executable, str(REPO / "extract" / "check_output.py"), str(output)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stdout == f"{output}: 1 of 16 rows are not done ({first})\n"
