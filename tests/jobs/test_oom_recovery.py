"""Out-of-memory recovery, on the CPU: the real engine, ESM-2 embedder and HDF5 file, with the error a GPU
raises when its memory runs out injected for batches above a token limit (as a smaller GPU would)."""

import json
import time

import h5py
import numpy as np
import pytest
import torch

from extract.data import input_index
from extract.runtime.identity import RankIdentity, rank_logger
from extract.engine.job import JobSettings, run_job
from extract.errors import JobError
from extract.models.esm2.embedder import Esm2Embedder
from extract.models.long_sequences import LongSequencePolicy
from extract.models.esm2.checkpoints import load_model
from extract.engine.planning import plan_batches
from extract.models.pooling import OUTPUTS
from fair_esm_reference import fair_esm_tokens, fair_esm_windowed
from jobs import ESM2_ALPHABET, phage_sample, write_fasta

LAYERS = [1, 2]
SINGLE_RANK = RankIdentity(0, 0, 1)


class OutOfMemoryAbove:
    """The real embedder, except that a batch of more than `max_tokens` padded tokens raises
    torch.OutOfMemoryError, and so does the low-memory path for sequences longer than `low_memory_max`."""

    def __init__(self, embedder: Esm2Embedder, max_tokens: int, low_memory_max: int | None = None):
        self.inner = embedder
        self.max_tokens = max_tokens
        self.low_memory_max = low_memory_max
        self.attempts: list[tuple[int, bool]] = []  # (padded tokens, ran out of memory) for every embed()
        self.low_memory_lengths: list[int] = []

    def __getattr__(self, name):  # device, datasets, tokens_per_input, ...: the real embedder's
        return getattr(self.inner, name)

    def embed(self, inputs):
        padded = len(inputs.tokens.lengths) * int(inputs.tokens.lengths.max())  # windows x tokens of the longest
        self.attempts.append((padded, padded > self.max_tokens))
        if padded > self.max_tokens:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {padded} tokens' worth")
        return self.inner.embed(inputs)

    def embed_low_memory(self, sequence):
        self.low_memory_lengths.append(len(sequence))
        if self.low_memory_max is not None and len(sequence) > self.low_memory_max:
            raise torch.OutOfMemoryError("CUDA out of memory, even in chunks")
        return self.inner.embed_low_memory(sequence)


def _embedder(model_path, mode="truncate", window=1022, overlap=None):
    policy = LongSequencePolicy.from_options(mode, window, overlap)
    return Esm2Embedder(load_model(str(model_path)), torch.device("cpu"), torch.float32, LAYERS, policy, OUTPUTS)


@pytest.fixture(scope="module")
def records(phage_dir):
    """Twelve tail-fibre proteins, the last one longer than 1022 residues (truncated to 1022)."""
    return phage_sample(phage_dir, 12, long=1)


@pytest.fixture(scope="module")
def expected(fair_esm_tiny, records):
    """Per row, fair-esm's own mean, BOS and per-residue representations (truncated as fair-esm does)."""
    model, alphabet = fair_esm_tiny
    rows = []
    for tokens in fair_esm_tokens(model, alphabet, [seq for _, seq in records], LAYERS):
        rows.append({name: value for layer in LAYERS for name, value in (
            (f"mean/layer_{layer}", tokens[layer][1:].mean(0)), (f"bos/layer_{layer}", tokens[layer][0]),
            (f"per_tok/layer_{layer}", tokens[layer][1:]))})
    return rows


def _job(tmp_path, records, embedder, budget=2048):
    """The job as `run_job` runs it, in this process: its input index, its output and a way to run it."""
    out = tmp_path / "out.h5"
    index = input_index.directory_for(out)
    input_index.prepare([write_fasta(tmp_path / "in.fasta", records)], ESM2_ALPHABET, index)
    inputs = input_index.load(index)
    log = rank_logger(SINGLE_RANK)
    job = JobSettings(out=out, toks_per_batch=budget, overwrite=False)
    run = lambda: run_job(SINGLE_RANK, inputs, embedder, job, log, time.monotonic())
    return inputs, out, run


def _assert_rows_match(out, expected, rows=None):
    """Every output of the given rows (default: all) equals fair-esm's."""
    with h5py.File(out, "r") as f:
        offsets = f["per_tok/offsets"][()]
        rows = range(len(expected)) if rows is None else rows
        for row in rows:
            for name, value in expected[row].items():
                stored = f[name][offsets[row]:offsets[row + 1]] if name.startswith("per_tok") else f[name][row]
                assert np.abs(stored - value).max() <= 1e-4, (row, name)


def _report(out):
    with h5py.File(out, "r") as f:
        return f.attrs["status"], json.loads(f.attrs["last_run"])["total"]


def test_batches_are_halved_and_the_budget_adapts(tmp_path, tiny_model_path, records, expected, capsys):
    model = OutOfMemoryAbove(_embedder(tiny_model_path), max_tokens=1100)
    inputs, out, run = _job(tmp_path, records, model)
    run()

    planned = plan_batches(np.arange(len(inputs)), model.tokens_per_input(inputs.lengths), 2048)
    # The first batch (2048 tokens) ran out of memory and was halved; the budget fell to the halves' 1024
    # tokens, so the second planned batch (more than 1024 tokens, also too big) was cut before it was tried.
    assert planned.batch_tokens[0] == 2048 and planned.batch_tokens[1] > 1024
    assert [oom for _, oom in model.attempts].count(True) == 1 and model.attempts[0][1]
    assert max(padded for padded, _ in model.attempts[1:]) <= 1024
    assert ("out of memory on 2 rows (2048 padded tokens); retrying in halves; token budget 2048 -> 1024 "
            in capsys.readouterr().err)
    status, total = _report(out)
    assert status == "complete"
    assert (total["oom_split_batches"], total["low_memory_rows"], total["failed_rows"]) == (1, 0, 0)
    _assert_rows_match(out, expected)


def test_a_sequence_too_long_alone_is_computed_in_chunks(tmp_path, tiny_model_path, records, expected, capsys):
    model = OutOfMemoryAbove(_embedder(tiny_model_path), max_tokens=600)
    _, out, run = _job(tmp_path, records, model)
    run()

    too_long = sorted(len(seq) for _, seq in records if min(len(seq), 1022) + 2 > 600)  # rows of > 600 tokens
    assert sorted(model.low_memory_lengths) == too_long and len(too_long) >= 2
    assert "alone; retrying with the low-memory forward" in capsys.readouterr().err
    status, total = _report(out)
    assert status == "complete" and total["low_memory_rows"] == len(too_long)
    _assert_rows_match(out, expected)  # the longest row truncated as fair-esm does


def test_a_windowed_protein_too_long_alone_is_computed_window_by_window(tmp_path, tiny_model_path, fair_esm_tiny,
                                                                        records):
    by_length = sorted((record for record in records if len(record[1]) <= 1022), key=lambda record: len(record[1]))
    chosen = [by_length[-1], by_length[len(by_length) // 2], by_length[0]]  # the longest, a middle one, the shortest
    model = OutOfMemoryAbove(_embedder(tiny_model_path, "window", 256, 64), max_tokens=1000)
    _, out, run = _job(tmp_path, chosen, model)
    run()

    windows = [len(LongSequencePolicy("window", 256, 64).window_starts(len(seq))) for _, seq in chosen]
    too_long = [len(seq) for (_, seq), count in zip(chosen, windows) if count * 258 > 1000]  # alone: > 1000 tokens
    assert model.low_memory_lengths == too_long and too_long == [len(by_length[-1][1])]
    fair_model, alphabet = fair_esm_tiny
    expected = [fair_esm_windowed(fair_model, alphabet, seq, 256, 64, LAYERS) for _, seq in chosen]
    assert _report(out)[0] == "complete"
    _assert_rows_match(out, expected)


def test_rows_that_never_fit_are_reported_and_left_for_a_rerun(tmp_path, tiny_model_path, records, expected, capsys):
    model = OutOfMemoryAbove(_embedder(tiny_model_path), max_tokens=600, low_memory_max=800)
    inputs, out, run = _job(tmp_path, records, model)
    with pytest.raises(JobError) as raised:
        run()

    failed = [rid for rid, seq in records if len(seq) > 800]
    assert raised.value.exit_code == 1
    assert str(raised.value) == (
        f"{out}: 2 row(s) did not fit in device memory even alone with the low-memory forward: "
        f"{', '.join(failed)}; every other row is saved and the file stays incomplete; "
        f"rerun the same command with more free device memory to compute them")
    err = capsys.readouterr().err
    assert all(f"not computed: {rid}, out of memory" in err for rid in failed)
    status, total = _report(out)
    assert status == "incomplete" and total["failed_rows"] == 2 and total["failed_ids"] == failed
    with h5py.File(out, "r") as f:
        done = f["done"][()]
    assert [inputs.ids[r] for r in np.flatnonzero(done == 0)] == failed
    _assert_rows_match(out, expected, np.flatnonzero(done))

    _, _, rerun = _job(tmp_path, records, _embedder(tiny_model_path))  # the same job where memory suffices
    rerun()
    assert "rows: 2 to write" in capsys.readouterr().err
    assert _report(out)[0] == "complete"
    _assert_rows_match(out, expected)
