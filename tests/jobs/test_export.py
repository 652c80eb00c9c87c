"""extract/export.py: fair-esm's `.pt` files from an output, compared with what fair-esm's extract writes.

The job and the exporter run in-process through their `main(argv)`; fair-esm's side is its extract
script's logic on the same weights (tests/fair_esm_reference.py).
"""

import os

import h5py
import numpy as np
import pytest
import torch

from extract import export
from fair_esm_reference import fair_esm_extract
from jobs import job_args, phage_sample, random_proteins, run_in_process
from output_checks import assert_same_as_fair_esms_files

ALL_OUTPUTS = ["--include", "mean", "bos", "per_tok"]


def _fasta(path, records, description=""):
    path.write_text("".join(f">{rid}{description}\n{seq}\n" for rid, seq in records))
    return path


def _embedded(tmp_path, model, fasta, *flags):
    out = tmp_path / "out.h5"
    assert run_in_process(job_args(model, fasta, out, *flags)) == 0
    return out


def _export(capsys, out, directory, *flags):
    """The exporter's exit code and what it printed (the job's log before it left out)."""
    capsys.readouterr()
    code = export.main([str(out), "--fair-esm-dir", str(directory), *flags])
    return code, capsys.readouterr()


def _assert_refused(exported, message):
    code, printed = exported
    assert code == 2
    assert printed.err == f"export: error: {message}\n" and printed.out == ""


@pytest.fixture(scope="module")
def proteins(phage_dir):
    """Tail-fibre proteins, two of them longer than 1022 residues (fair-esm's extract truncates those)."""
    return phage_sample(phage_dir, 7, long=2)


@pytest.mark.parametrize("include", [ALL_OUTPUTS, ["--include", "mean"], ["--include", "per_tok", "bos"]])
def test_files_are_fair_esms_for_the_same_weights(tmp_path, tiny_model_path, proteins, monkeypatch, capsys,
                                                  include):
    fasta = _fasta(tmp_path / "in.fasta", proteins)  # no descriptions: fair-esm's labels are the ids
    out = _embedded(tmp_path, tiny_model_path, fasta, *include, "--repr-layers", "0", "-1", "1",
                    "--toks-per-batch", "2100")
    monkeypatch.setattr(export, "ROWS_PER_READ", 3)  # proteins read in three slices, the last one short
    code, printed = _export(capsys, out, tmp_path / "ours")
    assert code == 0, printed.err
    assert printed.out == f"{out}: 7 proteins exported to {tmp_path / 'ours'}, one <id>.pt each\n"
    fair_esm_extract(tiny_model_path, fasta, tmp_path / "fair_esm", [0, -1, 1], include[1:])

    assert sorted(os.listdir(tmp_path / "ours")) == sorted(f"{rid}.pt" for rid, _ in proteins)
    assert_same_as_fair_esms_files(tmp_path / "ours", tmp_path / "fair_esm", layers=[0, 1, 2])


def test_progress_lines_count_the_proteins_exported(tmp_path, tiny_model_path, monkeypatch, capsys):
    out = _embedded(tmp_path, tiny_model_path, _fasta(tmp_path / "in.fasta", random_proteins(5, max_len=40)))
    monkeypatch.setattr(export, "ROWS_PER_READ", 2)
    with h5py.File(out) as f:
        residues = f["lengths"][:]
    code, printed = _export(capsys, out, tmp_path / "pt", "--progress-seconds", "0.000001")
    assert code == 0
    lines = printed.err.splitlines()
    assert [line.split(" export: ")[1].split(",")[0] for line in lines] == ["2/5 rows", "4/5 rows", "5/5 rows"]
    assert f"{residues.sum()}/{residues.sum()} residues (100%)" in lines[-1]


def test_a_slash_in_an_id_makes_a_subdirectory_as_in_fair_esms_extract(tmp_path, tiny_model_path, capsys):
    records = [("read7/1", "MKVLAAGGSW"), ("read7/2", "MKKLLPPQ"), ("50%id", "MVVSTRE"), ("plain", "MKT")]
    fasta = _fasta(tmp_path / "in.fasta", records)
    out = _embedded(tmp_path, tiny_model_path, fasta, *ALL_OUTPUTS)
    assert _export(capsys, out, tmp_path / "ours")[0] == 0
    assert sorted(os.listdir(tmp_path / "ours")) == ["50%id.pt", "plain.pt", "read7"]
    fair_esm_extract(tiny_model_path, fasta, tmp_path / "fair_esm", [-1], ["mean", "bos", "per_tok"])
    assert_same_as_fair_esms_files(tmp_path / "ours", tmp_path / "fair_esm", layers=[2])


def test_the_label_is_the_id_and_float16_values_come_as_float32(tmp_path, tiny_model_path, capsys):
    records = [("first", "MKVLAAGGSW"), ("second", "MKKLLPPQ")]
    fasta = _fasta(tmp_path / "in.fasta", records, description=" a description fair-esm's label would keep")
    out = _embedded(tmp_path, tiny_model_path, fasta, "--storage-dtype", "float16")
    assert _export(capsys, out, tmp_path / "pt")[0] == 0
    with h5py.File(out) as f:
        stored = f["mean/layer_2"][:]
    for row, (rid, _) in enumerate(records):
        result = torch.load(tmp_path / "pt" / f"{rid}.pt", weights_only=True)
        assert list(result) == ["label", "mean_representations"] and result["label"] == rid
        values = result["mean_representations"][2]
        assert values.dtype == torch.float32
        np.testing.assert_array_equal(values.numpy(), stored[row].astype(np.float32))


@pytest.mark.parametrize("bad_id, problem", [
    ("../escaped", "the id would name a file outside --fair-esm-dir (a part between slashes is empty, '.' or '..')"),
    ("/etc/x", "the id would name a file outside --fair-esm-dir (a part between slashes is empty, '.' or '..')"),
    ("a//b", "the id would name a file outside --fair-esm-dir (a part between slashes is empty, '.' or '..')"),
    ("p" * 253, "the id is too long to name a file (at most 255 bytes between slashes, .pt included)")])
def test_an_id_that_cannot_name_a_file_in_the_directory_is_refused_before_anything_is_written(
        tmp_path, tiny_model_path, capsys, bad_id, problem):
    fasta = _fasta(tmp_path / "in.fasta", [("fine", "MKV"), (bad_id, "MKT")])
    out = _embedded(tmp_path, tiny_model_path, fasta)
    shown = bad_id if len(bad_id) <= 60 else f"{bad_id[:60]}..."
    _assert_refused(_export(capsys, out, tmp_path / "pt"), f"{out}: row 2 ({shown}): {problem}; nothing exported")
    assert os.listdir(tmp_path / "pt") == []


def test_an_unfinished_output_is_refused(tmp_path, tiny_model_path, capsys):
    out = _embedded(tmp_path, tiny_model_path, _fasta(tmp_path / "in.fasta", random_proteins(3, max_len=30)))
    with h5py.File(out, "r+") as f:  # as a stopped job leaves it
        f.attrs["status"] = "incomplete"
    _assert_refused(_export(capsys, out, tmp_path / "pt"),
                    f"{out}: the job that writes it has not finished (status 'incomplete'); "
                    f"rerun it to complete the output, then export")
    assert not (tmp_path / "pt").exists()


def test_a_file_that_is_no_output_is_refused(tmp_path, capsys):
    missing, other = tmp_path / "missing.h5", tmp_path / "other.h5"
    _assert_refused(_export(capsys, missing, tmp_path / "pt"), f"{missing}: no such file")
    with h5py.File(other, "w") as f:
        f["x"] = [1]
    _assert_refused(_export(capsys, other, tmp_path / "pt"), f"{other}: exists and is not an esm-features output")
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    code, printed = _export(capsys, text, tmp_path / "pt")
    assert code == 2 and printed.err.startswith(f"export: error: {text}: not a readable HDF5 file (")


def test_a_directory_that_is_a_file_is_refused(tmp_path, tiny_model_path, capsys):
    out = _embedded(tmp_path, tiny_model_path, _fasta(tmp_path / "in.fasta", random_proteins(2, max_len=30)))
    (tmp_path / "taken").write_text("")
    _assert_refused(_export(capsys, out, tmp_path / "taken"),
                    f"--fair-esm-dir {tmp_path / 'taken'}: exists and is not a directory")


@pytest.mark.parametrize("seconds", ["0", "-1", "nan"])
def test_a_progress_interval_that_is_no_positive_number_is_refused(tmp_path, capsys, seconds):
    _assert_refused(_export(capsys, tmp_path / "out.h5", tmp_path / "pt", "--progress-seconds", seconds),
                    f"--progress-seconds {float(seconds)}: give a positive number of seconds")


def test_a_full_disk_stops_the_export_in_one_line_and_leaves_only_whole_files(tmp_path, tiny_model_path, capsys,
                                                                              small_file_system):
    fasta = _fasta(tmp_path / "in.fasta", random_proteins(12, min_len=280, max_len=300))
    out = _embedded(tmp_path, tiny_model_path, fasta, "--include", "per_tok", "--repr-layers", "0", "1", "2")
    code, printed = _export(capsys, out, small_file_system)  # 12 files of about 220 KiB; 1 MiB holds 4
    written = sorted(small_file_system.iterdir())
    assert code == 1 and 0 < len(written) < 12
    assert printed.err == (f"export: error: {small_file_system / 'prot0_'}{len(written)}.pt: cannot write it (No space "
                           f"left on device); the {len(written)} files before it are complete; rerun the export once "
                           f"that is fixed\n")
    for path in written:  # no partial file: each one whole
        assert torch.load(path, weights_only=True)["representations"][2].shape[1] == 64
