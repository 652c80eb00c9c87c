"""Proteins longer than the model's window: truncated, or covered by overlapping windows."""

import random

import numpy as np
import pytest

from extract.models.long_sequences import LongSequencePolicy
from fair_esm_reference import fair_esm_windowed, most_central_window
from jobs import AMINO_ACIDS, job_args, phage_sample, run_extract, run_in_process, write_fasta
from output_checks import read_all

ALL_OUTPUTS = ["--include", "mean", "bos", "per_tok", "--repr-layers", "0", "-1"]
LAYERS = [0, 2]


def _row(data, name, row):
    if name.startswith("per_tok"):
        offsets = data["per_tok/offsets"]
        return data[name][offsets[row] : offsets[row + 1]]
    return data[name][row]


@pytest.mark.parametrize("window, overlap", [(30, 10), (30, 0), (30, 29), (7, 3), (1, 0), (1022, 255)])
def test_windows_cover_the_protein_overlapping_by_at_least_the_overlap(window, overlap):
    policy = LongSequencePolicy("window", window, overlap)
    for length in [*range(1, 4 * window + 3), 5000]:
        starts = policy.window_starts(length)
        if length <= window:
            assert starts.tolist() == [0]
            continue
        assert starts[0] == 0 and starts[-1] + window == length
        assert (np.diff(starts) > 0).all() and (starts[:-1] + window - starts[1:] >= overlap).all()
        fewer = len(starts) - 1  # could one window less cover the protein with that overlap? It must not.
        assert fewer * window - (fewer - 1) * overlap < length


@pytest.mark.parametrize("window, overlap", [(30, 10), (30, 29), (8, 0), (1022, 255)])
def test_each_residue_is_kept_once_from_its_most_central_window(window, overlap):
    policy = LongSequencePolicy("window", window, overlap)
    lengths = np.array([1, window - 1, window, window + 1, 2 * window + 5, 7 * window + 3])
    layout = policy.layout(lengths)
    assert layout.embedded.tolist() == lengths.tolist()
    for protein, length in enumerate(lengths):
        windows = np.flatnonzero(layout.protein == protein)
        assert windows[0] == layout.first_window[protein]
        assert (layout.stop[windows] - layout.start[windows] == min(window, length)).all()
        kept_from = np.concatenate([np.repeat(w, layout.keep_stop[w] - layout.keep_start[w]) for w in windows])
        kept_residue = np.concatenate([np.arange(layout.keep_start[w], layout.keep_stop[w]) + layout.start[w]
                                       for w in windows])
        assert kept_residue.tolist() == list(range(length))
        central = most_central_window(layout.start[windows], layout.stop[windows], length)
        assert (kept_from - windows[0]).tolist() == central.tolist()


def test_truncation_keeps_the_first_window():
    layout = LongSequencePolicy("truncate", 30, 0).layout(np.array([10, 30, 31, 200]))
    assert layout.protein.tolist() == [0, 1, 2, 3] and layout.start.tolist() == [0, 0, 0, 0]
    assert layout.stop.tolist() == layout.keep_stop.tolist() == layout.embedded.tolist() == [10, 30, 30, 30]


@pytest.fixture(scope="module")
def synthetic_runs(tmp_path_factory, tiny_model_path):
    """Proteins of 5 to 140 residues through a 30-residue window, in both modes."""
    tmp = tmp_path_factory.mktemp("windows")
    rng = random.Random(7)
    lengths = [12, 30, 140, 31, 5, 52, 97, 29, 53]
    records = [(f"p{i}", "".join(rng.choices(AMINO_ACIDS, k=n))) for i, n in enumerate(lengths)]
    fasta = write_fasta(tmp / "in.fasta", records)
    runs = {"records": records}
    for mode in ("window", "truncate"):
        out = tmp / f"{mode}.h5"
        overlap = ["--window-overlap", "10"] if mode == "window" else []
        assert run_in_process(job_args(tiny_model_path, fasta, out, *ALL_OUTPUTS, "--truncation-seq-length", "30",
                                       "--long-sequences", mode, *overlap)) == 0
        runs[mode] = read_all(out)
    return runs


def test_windowed_rows_equal_fair_esm_on_the_windows_they_come_from(synthetic_runs, fair_esm_tiny):
    data, attrs = synthetic_runs["window"]
    model, alphabet = fair_esm_tiny
    records = synthetic_runs["records"]
    lengths = [len(seq) for _, seq in records]
    assert data["per_tok/offsets"].tolist() == [0, *np.cumsum(lengths).tolist()]
    assert data["lengths"].tolist() == lengths and data["truncated"].tolist() == [0] * len(records)
    for row, (_, seq) in enumerate(records):
        for name, expected in fair_esm_windowed(model, alphabet, seq, 30, 10, LAYERS).items():
            assert np.abs(_row(data, name, row) - expected).max() <= 1e-4, (row, name)
    assert (attrs["long_sequences"], attrs["window_length"], attrs["window_overlap"]) == ("window", 30, 10)
    assert attrs["status"] == "complete"


def test_rows_that_fit_one_window_are_identical_in_both_modes(synthetic_runs):
    windowed, _ = synthetic_runs["window"]
    truncated, attrs = synthetic_runs["truncate"]
    lengths = np.array([len(seq) for _, seq in synthetic_runs["records"]])
    assert truncated["truncated"].tolist() == (lengths > 30).astype(int).tolist()
    assert attrs["long_sequences"] == "truncate" and "window_overlap" not in attrs
    names = [name for name in windowed if name.split("/")[0] in ("mean", "bos", "per_tok") and "offsets" not in name]
    for row in np.flatnonzero(lengths <= 30):
        for name in names:
            np.testing.assert_array_equal(_row(windowed, name, row), _row(truncated, name, row), err_msg=name)
    for row in np.flatnonzero(lengths > 30):  # truncation keeps the first 30 residues' rows
        assert len(_row(truncated, "per_tok/layer_2", row)) == 30


def test_real_long_proteins_through_the_default_window(tmp_path, tiny_model_path, fair_esm_tiny, phage_dir):
    records = phage_sample(phage_dir, 4, long=2)  # 1151 and 1062 residues
    fasta = write_fasta(tmp_path / "phage.fasta", records)
    out = tmp_path / "out.h5"
    done = run_extract(job_args(tiny_model_path, fasta, out, *ALL_OUTPUTS, "--long-sequences", "window"), nproc=2)
    assert done.returncode == 0, done.stderr
    data, attrs = read_all(out)
    assert (attrs["window_length"], attrs["window_overlap"]) == (1022, 255)
    model, alphabet = fair_esm_tiny
    for row, (_, seq) in enumerate(records):
        for name, expected in fair_esm_windowed(model, alphabet, seq, 1022, 255, LAYERS).items():
            assert np.abs(_row(data, name, row) - expected).max() <= 1e-4, (row, name)


@pytest.mark.parametrize("flags, message", [
    (["--long-sequences", "window", "--truncation-seq-length", "30", "--window-overlap", "30"],
     "--window-overlap 30: must be at least 0 and less than the window of 30 residues (--truncation-seq-length)"),
    (["--long-sequences", "window", "--window-overlap", "-1"],
     "--window-overlap -1: must be at least 0 and less than the window of 1022 residues (--truncation-seq-length)"),
    (["--window-overlap", "100"], "--window-overlap applies only with --long-sequences window"),
    (["--truncation-seq-length", "0"], "--truncation-seq-length 0: must be at least 1"),
])
def test_bad_window_settings_are_one_line_and_exit_2(tmp_path, tiny_model_path, capsys, flags, message):
    fasta = write_fasta(tmp_path / "in.fasta", [("a", "MKV")])
    out = tmp_path / "out.h5"
    assert run_in_process(job_args(tiny_model_path, fasta, out, *flags)) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"esm_features: error: {message}"]
    assert not out.exists()
