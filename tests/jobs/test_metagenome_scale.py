"""Metagenome scale: the input read once into a compact index, identical sequences computed once, a dry
run that plans exactly as the job does, and a resumed job that does not read its inputs again."""

import contextlib
import gzip
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from fair_esm_reference import fair_esm_windowed
from jobs import (REPO, clean_env, extract_command, job_args, process_tree, random_proteins, run_extract,
                  run_in_process, write_fasta)
from output_checks import read_all

# Mean and per-residue rows, proteins of 20 to 120 residues cut into windows of 40: a computed record's
# copies take windows and per-token rows too.
OUTPUTS = ["--toks-per-batch", "150", "--include", "mean", "per_tok", "--long-sequences", "window",
           "--truncation-seq-length", "40", "--window-overlap", "10"]
DATASETS = ("mean/layer_2", "per_tok/layer_2")
MEMORY_RECORDS = 1_000_000
# The reader before the index (a Python str per id and per sequence) grew by 380 MiB reading these alone.
MEMORY_BOUND_MIB = 300


def _variant(sequence: str, how: int) -> str:
    """The same protein as users may write it again: as it was, lowercase with a stop, or wrapped."""
    wrapped = "\n".join(sequence[i : i + 30] for i in range(0, len(sequence), 30))
    return [sequence, sequence.lower() + "*", wrapped][how % 3]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two files, the second gzip, with identical sequences inside each and across them."""
    folder = tmp_path_factory.mktemp("inputs")
    first = random_proteins(150, seed=11, min_len=20, max_len=120)
    second = random_proteins(60, seed=12, min_len=20, max_len=120)
    rng = np.random.default_rng(5)
    a = first + [(f"a_copy{i}", _variant(first[j][1], i)) for i, j in enumerate(rng.integers(0, 150, 50))]
    b = second + [(f"b_copy{i}", _variant(first[j][1], i)) for i, j in enumerate(rng.integers(0, 150, 60))]
    b += [(f"b_self{i}", _variant(second[j][1], i)) for i, j in enumerate(rng.integers(0, 60, 20))]
    write_fasta(folder / "a.fasta", a)
    (folder / "b.fasta.gz").write_bytes(gzip.compress(write_fasta(folder / "b.fasta", b).read_bytes()))
    rows = [(rid, seq.replace("\n", "").upper().rstrip("*")) for rid, seq in a + b]
    return [folder / "a.fasta", folder / "b.fasta.gz"], rows


@pytest.fixture(scope="module")
def expected(inputs, fair_esm_tiny):
    """fair-esm's own forward on the windows of every row, each distinct sequence computed once."""
    _, rows = inputs
    model, alphabet = fair_esm_tiny
    windowed = {seq: fair_esm_windowed(model, alphabet, seq, 40, 10, [2]) for seq in {seq for _, seq in rows}}
    return {"mean/layer_2": np.stack([windowed[seq]["mean/layer_2"] for _, seq in rows]),
            "per_tok/layer_2": np.concatenate([windowed[seq]["per_tok/layer_2"] for _, seq in rows])}


def _assert_close(data, reference, tolerance):
    for name in DATASETS:
        assert np.abs(data[name] - reference[name]).max() <= tolerance, name


def _plan_lines(text):
    return [line.split("] ", 1)[-1] for line in text.splitlines()
            if re.match(r"(.*\] )?(rows|compute|batches|ranks): ", line)]


@pytest.fixture(scope="module")
def uninterrupted(inputs, tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "out.h5"
    done = run_extract(job_args(tiny_model_path, inputs[0], out, *OUTPUTS), nproc=2)
    assert done.returncode == 0, done.stderr
    return out, done.stderr


def test_identical_sequences_are_computed_once_and_equal_a_no_dedupe_run(inputs, expected, uninterrupted,
                                                                       tiny_model_path, tmp_path, capsys):
    files, rows = inputs
    out, log = uninterrupted
    single = tmp_path / "no_dedupe.h5"
    assert run_in_process(job_args(tiny_model_path, files, single, *OUTPUTS, "--no-dedupe")) == 0
    (dedupe, attrs), (every, every_attrs) = read_all(out), read_all(single)
    assert [i.decode() for i in dedupe["ids"]] == [rid for rid, _ in rows]
    assert dedupe["lengths"].tolist() == [len(seq) for _, seq in rows]
    for name in ("ids", "lengths", "done", "per_tok/offsets"):
        np.testing.assert_array_equal(dedupe[name], every[name])
    _assert_close(dedupe, every, 1e-5)
    _assert_close(dedupe, expected, 1e-4)
    _assert_close(every, expected, 1e-4)
    distinct = len({seq for _, seq in rows})
    share = 100 * (len(rows) - distinct) / len(rows)
    assert f"{len(rows)} rows, {distinct} of them computed ({share:.1f}% were copies" in log
    assert f"{len(rows)} rows, {len(rows)} of them computed (0.0% were copies" in capsys.readouterr().err
    assert '"rows_computed": %d' % distinct in attrs["last_run"] and attrs["status"] == "complete"
    assert attrs["fingerprint"] == every_attrs["fingerprint"]
    assert not (out.parent / "out.h5.inputs").exists() and not (tmp_path / "no_dedupe.h5.inputs").exists()


def test_dry_run_writes_nothing_and_plans_as_the_run_does(inputs, uninterrupted, tiny_model_path, tmp_path, capsys):
    files, rows = inputs
    out = tmp_path / "planned.h5"
    assert run_in_process(job_args(tiny_model_path, files, out, *OUTPUTS, "--dry-run", "2")) == 0
    dry = capsys.readouterr().out
    assert os.listdir(tmp_path) == []
    distinct = len({seq for _, seq in rows})
    assert f"inputs: {len(rows)} rows" in dry and f"{distinct} distinct sequences" in dry
    assert f"output: {out} would be created" in dry
    assert _plan_lines(dry) == _plan_lines(uninterrupted[1])
    assert len(_plan_lines(dry)) == 4
    assert run_in_process(job_args(tiny_model_path, files, uninterrupted[0], *OUTPUTS, "--dry-run")) == 0
    assert f"{uninterrupted[0]} is complete; a run would do nothing" in capsys.readouterr().out


def _kill_once_rows_are_done(args, out):
    """Start a 2-rank job; SIGKILL the agent and its ranks once some rows are done."""
    job = subprocess.Popen(extract_command(args, nproc=2), env=clean_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and job.poll() is None:
            if out.exists():
                with h5py.File(out, "r", locking=False) as f:
                    done = int(f["done"][()].sum())
                if done:
                    return
            time.sleep(0.005)
        raise AssertionError("the job ended or ran out of time before any row was done")
    finally:
        for pid in process_tree(job.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        job.wait()


def test_killed_job_with_dedupe_resumes_from_its_saved_index(inputs, expected, uninterrupted, tiny_model_path,
                                                             tmp_path, capsys):
    files, rows = inputs
    out = tmp_path / "out.h5"
    args = job_args(tiny_model_path, files, out, *OUTPUTS)
    _kill_once_rows_are_done(args, out)
    done_at_kill = int(read_all(out)[0]["done"].sum())
    assert 0 < done_at_kill < len(rows) and (tmp_path / "out.h5.inputs" / "manifest.json").exists()
    assert run_in_process([*args, "--dry-run", "2"]) == 0
    dry = capsys.readouterr().out
    assert f"would be resumed, {done_at_kill} of {len(rows)} rows are done" in dry
    rerun = run_extract(args, nproc=2)
    assert rerun.returncode == 0, rerun.stderr
    assert "input index reused (inputs unchanged)" in rerun.stderr
    assert _plan_lines(rerun.stderr) == _plan_lines(dry)
    assert f"rows: {len(rows) - done_at_kill:,} to write" in rerun.stderr
    resumed, attrs = read_all(out)
    reference, _ = read_all(uninterrupted[0])
    for name in ("ids", "lengths", "done", "per_tok/offsets"):
        np.testing.assert_array_equal(resumed[name], reference[name])
    _assert_close(resumed, reference, 1e-5)
    _assert_close(resumed, expected, 1e-4)
    assert attrs["status"] == "complete" and not (tmp_path / "out.h5.inputs").exists()


def test_duplicate_ids_across_files_are_refused_before_anything_is_written(inputs, tiny_model_path, tmp_path,
                                                                          capsys):
    files, _ = inputs
    again = tmp_path / "again.fasta"
    again.write_text(">x1 fine\nMKV\n>a_copy7 the same id as in a.fasta\nMKV\n")
    out = tmp_path / "out.h5"
    assert run_in_process(job_args(tiny_model_path, [files[0], again], out, *OUTPUTS)) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"esm_features: error: {again}: record 2 (a_copy7): duplicate id, "
        f"first seen at {files[0]}: record 158 (a_copy7)")
    assert "Traceback" not in err and os.listdir(tmp_path) == ["again.fasta"]


@pytest.fixture(scope="module")
def million_reads(tmp_path_factory):
    path = tmp_path_factory.mktemp("reads") / "reads.fasta"
    made = subprocess.run([sys.executable, str(REPO / "launch" / "make_reads.py"), "--records", str(MEMORY_RECORDS),
                           "--duplicate-share", "0.3", "--out", str(path)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    return path


def test_planning_a_million_short_proteins_stays_within_its_memory_bound(million_reads, tmp_path):
    """Peak RSS of a dry run (read, validate, dedupe, plan) in a fresh process, over what its imports take."""
    measure = (
        "import resource, sys\n"
        "from extract.esm_features import main\n"
        "imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "rc = main(sys.argv[1:])\n"
        "print('growth_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - imports)\n"
        "sys.exit(rc)\n")
    done = subprocess.run([sys.executable, "-c", measure, "--model", "random:esm2_t33_650M_UR50D", "--fasta",
                           str(million_reads), "--out", str(tmp_path / "reads.h5"), "--dry-run", "8"],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"inputs: {MEMORY_RECORDS + 2:,} rows" in done.stdout  # whole reads: six proteins each
    growth_mib = int(done.stdout.split("growth_kib ")[1]) / 1024
    assert growth_mib < MEMORY_BOUND_MIB, f"the dry run grew by {growth_mib:.0f} MiB"
    assert os.listdir(tmp_path) == []
