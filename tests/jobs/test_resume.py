"""What a rerun does with an existing output: resume it, leave a complete one alone, refuse a different one.

(Resuming after real interruptions, with other world sizes: test_interruptions.py.)
"""

import hashlib
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from extract.output import hdf5_file
from extract.models.esm2.checkpoints import build_random_esm2, fair_esm_checkpoint
from fair_esm_reference import fair_esm_means
from jobs import job_args, random_proteins, run_in_process, write_fasta

REFUSAL = "exists and was made from other inputs or settings; pass --overwrite to replace it, or choose another --out"


@pytest.fixture
def job(tmp_path, tiny_model_path):
    """A complete output of six proteins, and a way to rerun with changes."""
    records = random_proteins(6, seed=21, max_len=80)
    fasta = write_fasta(tmp_path / "in.fasta", records)
    out = tmp_path / "out.h5"

    def run(*extra, fasta_path=fasta):
        return run_in_process(job_args(tiny_model_path, fasta_path, out, *extra))

    assert run() == 0
    return records, out, run


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("extra", [[], ["--overwrite"]], ids=["plain", "overwrite"])  # it only replaces another job's
def test_rerun_of_a_complete_output_changes_nothing(job, capsys, extra):
    _, out, run = job
    before = _digest(out)
    capsys.readouterr()
    assert run(*extra) == 0
    assert f"{out} is already complete; nothing to do" in capsys.readouterr().err
    assert _digest(out) == before


@pytest.mark.parametrize("change", ["other input", "--repr-layers 1", "--truncation-seq-length 50", "--dtype bf16"])
def test_output_from_other_inputs_or_settings_is_refused(tmp_path, job, capsys, change):
    records, out, run = job
    before = _digest(out)
    if change == "other input":
        changed = [(rid, seq if i != 3 else seq[:-1]) for i, (rid, seq) in enumerate(records)]
        code = run(fasta_path=write_fasta(tmp_path / "changed.fasta", changed))
    else:
        code = run(*change.split())
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1] == f"esm_features: error: {out}: {REFUSAL}"
    assert "Traceback" not in err
    assert _digest(out) == before
    assert sorted(p.name for p in tmp_path.glob("out.h5*")) == ["out.h5"]


def test_a_checkpoint_of_the_same_name_with_other_weights_is_refused(tmp_path, tiny_model_path, job, capsys):
    _, out, run = job
    with h5py.File(out, "r") as f:
        assert f.attrs["model"] == "tiny_esm2"
        assert f.attrs["model_sha256"] == hashlib.sha256(tiny_model_path.read_bytes()).hexdigest()
    other = tmp_path / "elsewhere" / tiny_model_path.name
    other.parent.mkdir()
    torch.save(fair_esm_checkpoint(build_random_esm2(2, 64, 4, seed=2)), other)
    before = _digest(out)
    capsys.readouterr()
    assert run("--model", str(other)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"esm_features: error: {out}: {REFUSAL}"
    assert _digest(out) == before


def test_a_reader_holding_the_file_at_the_end_is_waited_for_then_told(job, capsys, monkeypatch):
    """A reader with HDF5's file lock (h5py's default) keeps the run from marking the file: after a wait,
    one line, exit 1, every row kept; the rerun after the reader has gone marks it complete."""
    _, out, run = job
    with h5py.File(out, "r+") as f:  # as if the run had been stopped before rows 2 and 3
        f.attrs["status"] = "incomplete"
        f["done"][2:4] = 0
    reader = subprocess.Popen([sys.executable, "-c", "import h5py, sys; f = h5py.File(sys.argv[1], 'r'); "
                               "print('open', flush=True); sys.stdin.read()", str(out)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline() == "open\n"
    monkeypatch.setattr(hdf5_file, "LOCK_WAIT_SECONDS", 1.0)
    capsys.readouterr()
    try:
        assert run() == 1
    finally:
        reader.communicate("")
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"esm_features: error: {out}: another process holds it open (HDF5's file lock), so this run cannot mark "
        f"it; every finished row is kept; close it (read with h5py.File(..., locking=False) while a job runs) and "
        f"rerun the same command to finish")
    with h5py.File(out, "r") as f:
        assert f.attrs["status"] == "incomplete" and f["done"][()].all()
    assert run() == 0
    assert "rows: 0 to write" in capsys.readouterr().err
    with h5py.File(out, "r") as f:
        assert f.attrs["status"] == "complete"
        assert json.loads(f.attrs["last_run"])["total"]["rows"] == 6  # a run that computed rows says what it did


def test_overwrite_replaces_an_output_made_differently(tmp_path, fair_esm_tiny, job):
    _, out, run = job
    with h5py.File(out, "r") as f:
        old_fingerprint = f.attrs["fingerprint"]
    other = random_proteins(4, seed=22, max_len=60)
    assert run("--overwrite", fasta_path=write_fasta(tmp_path / "other.fasta", other)) == 0

    model, alphabet = fair_esm_tiny
    expected = fair_esm_means(model, alphabet, [seq for _, seq in other], [2])[2]
    with h5py.File(out, "r") as f:
        assert f.attrs["status"] == "complete" and f.attrs["fingerprint"] != old_fingerprint
        assert f["ids"].asstr()[()].tolist() == [rid for rid, _ in other]
        assert np.abs(f["mean/layer_2"][()] - expected).max() <= 1e-4


@pytest.mark.parametrize("existing, problem", [
    ("text", "exists but is not a readable HDF5 file ("),
    ("foreign hdf5", "exists and is not an esm-features output; pass --overwrite to replace it"),
])
def test_a_file_that_is_not_our_output_is_refused(tmp_path, tiny_model_path, capsys, existing, problem):
    out = tmp_path / "out.h5"
    if existing == "text":
        out.write_text("my notes\n")
    else:
        with h5py.File(out, "w") as f:
            f["data"] = np.arange(3)
    before = _digest(out)
    fasta = write_fasta(tmp_path / "in.fasta", random_proteins(2, max_len=30))
    code = run_in_process(job_args(tiny_model_path, fasta, out))
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"esm_features: error: {out}: {problem}")
    assert _digest(out) == before
