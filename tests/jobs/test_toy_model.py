"""The engine runs a model that is not ESM-2: whole jobs with the toy DNA model of tests/toy_model.py,
through the same entry point as extract/esm_features.py (tests/toy_driver.py), checked against the
toy's values worked out from the sequences in the test."""

import json
import random
import signal

import h5py
import numpy as np
import pytest

from extract.check_output import find_problems
from job_control import start_extract, wait_for_done_rows
from jobs import REPO, run_extract
from output_checks import read_all
from toy_model import LETTERS, expected_rows

DRIVER = REPO / "tests" / "toy_driver.py"
MAX_RESIDUES = 48
EVERY_OUTPUT = ["--include", "mean", "bos", "per_tok"]


def _toy_args(fasta, out, *extra):
    return ["--fasta", *fasta, "--out", out, "--max-residues", MAX_RESIDUES, "--toks-per-batch", "120", *extra]


@pytest.fixture(scope="module")
def dna(tmp_path_factory):
    """Two files of DNA, 1 to 90 residues (those over 48 truncated), written as users write it (lower case,
    wrapped), with identical sequences inside each file and across them; and each row's clean sequence."""
    rng = random.Random(3)
    distinct = ["".join(rng.choices(LETTERS, k=rng.randint(1, 90))) for _ in range(80)]
    rows = [(f"r{i}", distinct[rng.randrange(len(distinct))] if i >= 60 else distinct[i]) for i in range(120)]
    folder = tmp_path_factory.mktemp("dna")
    files = [folder / "a.fasta", folder / "b.fasta"]
    for path, part in zip(files, (rows[:70], rows[70:])):
        path.write_text("".join(f">{rid} read\n{_as_written(seq, n)}\n" for n, (rid, seq) in enumerate(part)))
    return files, rows


def _as_written(sequence, n):
    return [sequence, sequence.lower(), "\n".join(sequence[i : i + 25] for i in range(0, len(sequence), 25))][n % 3]


def _assert_toy_values(out, rows, outputs=("mean", "bos", "per_tok")):
    """The file holds the toy's values of every row, is complete, and check_output finds nothing wrong."""
    data, attrs = read_all(out)
    assert attrs["status"] == "complete" and attrs["model"] == "toy composition"
    assert [i.decode() for i in data["ids"]] == [rid for rid, _ in rows]
    lengths = np.array([len(seq) for _, seq in rows])
    assert data["lengths"].tolist() == lengths.tolist()
    assert data["truncated"].tolist() == (lengths > MAX_RESIDUES).astype(int).tolist()
    assert data["done"].tolist() == [1] * len(rows)
    assert sorted(name for name in data if name.endswith("layer_0")) == sorted(f"{o}/layer_0" for o in outputs)
    offsets = data.get("per_tok/offsets")
    for row, (_, seq) in enumerate(rows):
        expected = expected_rows(seq, MAX_RESIDUES)
        for output in outputs:
            name = f"{output}/layer_0"
            stored = data[name][offsets[row] : offsets[row + 1]] if output == "per_tok" else data[name][row]
            np.testing.assert_allclose(stored, expected[name], rtol=1e-6, err_msg=f"{name}, row {row}")


@pytest.mark.parametrize("nproc", [None, 2])
def test_a_job_with_the_toy_model_writes_its_values(tmp_path, dna, nproc):
    files, rows = dna
    out, report = tmp_path / "toy.h5", tmp_path / "report.json"
    done = run_extract(_toy_args(files, out, *EVERY_OUTPUT, "--report", report), nproc=nproc, script=DRIVER)
    assert done.returncode == 0, done.stderr
    _assert_toy_values(out, rows)
    assert find_problems(out, files) == []
    assert json.loads(report.read_text())["total"]["ranks"] == (nproc or 1)
    assert "toy composition model on cpu" in done.stderr


def test_identical_sequences_are_computed_once(tmp_path, dna):
    files, rows = dna
    runs = {}
    for flags in ([], ["--no-dedupe"]):
        out, report = tmp_path / f"toy{len(flags)}.h5", tmp_path / f"report{len(flags)}.json"
        done = run_extract(_toy_args(files, out, "--include", "mean", "per_tok", "--report", report, *flags),
                           script=DRIVER)
        assert done.returncode == 0, done.stderr
        _assert_toy_values(out, rows, ("mean", "per_tok"))
        runs[bool(flags)] = json.loads(report.read_text())["total"]
    distinct = {seq for _, seq in rows}
    assert runs[False]["rows"] == runs[True]["rows"] == len(rows)
    assert runs[False]["rows_computed"] == len(distinct) < len(rows) == runs[True]["rows_computed"]
    assert runs[False]["residues_computed"] == sum(map(len, distinct))
    # The toy's own counts: each row's residues up to 48, and padded batches of the longest input's tokens.
    assert runs[False]["residues_embedded"] == sum(min(len(seq), MAX_RESIDUES) for seq in distinct)
    assert runs[False]["tokens"] > runs[False]["residues_embedded"] + len(distinct)


def test_a_toy_job_stopped_half_way_resumes_on_two_ranks(tmp_path, dna):
    files, rows = dna
    out = tmp_path / "toy.h5"
    args = _toy_args(files, out, *EVERY_OUTPUT, "--toks-per-batch", "60")
    job = start_extract([*args, "--seconds-per-batch", "0.05"], script=DRIVER)
    done_before = wait_for_done_rows(out, job, at_least=10)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 128 + signal.SIGTERM
    assert stderr.splitlines()[-1] == ("toy_driver: stopped by SIGTERM; every finished row is saved; "
                                       "rerun the same command to resume")
    with h5py.File(out, "r") as f:
        done_after_stop = f["done"][()]
        assert f.attrs["status"] == "incomplete"
    assert (done_after_stop >= done_before).all() and done_after_stop.sum() < len(rows)

    resumed = run_extract(args, nproc=2, script=DRIVER)
    assert resumed.returncode == 0, resumed.stderr
    assert f"rows: {len(rows) - int(done_after_stop.sum()):,} to write" in resumed.stderr
    _assert_toy_values(out, rows)
    assert find_problems(out, files) == []


def test_a_record_outside_the_toys_alphabet_is_refused_with_one_line(tmp_path):
    fasta = tmp_path / "mixed.fasta"
    fasta.write_text(">read1\nACGTN\n>protein2\nMKVLA\n")
    out = tmp_path / "toy.h5"
    done = run_extract(_toy_args([fasta], out), script=DRIVER)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (f"toy_driver: error: {fasta}: record 2 (protein2): character(s) 'KLMV' "
                                            f"not in the DNA alphabet ACGTN")
    assert "Traceback" not in done.stderr
    assert not out.exists() and not (tmp_path / "toy.h5.inputs").exists()
