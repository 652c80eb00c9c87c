"""The compute dtype of a whole job: bf16 against fp32 fair-esm on real proteins, and what `auto` chose and why."""

import json

import h5py
import numpy as np
import torch

from extract.runtime.device import choose_dtype, dtype_name
from fair_esm_reference import fair_esm_tokens
from jobs import job_args, phage_sample, run_extract, run_in_process, write_fasta
from output_checks import lowest_cosine

LAYERS = [0, 1, 2]


def test_a_bf16_job_keeps_mean_bos_and_residue_rows_close_to_fp32_fair_esm(tmp_path, tiny_model_path, fair_esm_tiny,
                                                                             phage_dir, capsys):
    records = phage_sample(phage_dir, 10, long=1)
    fasta, out, report = write_fasta(tmp_path / "in.fasta", records), tmp_path / "out.h5", tmp_path / "report.json"
    assert run_in_process(job_args(tiny_model_path, fasta, out, "--dtype", "bf16", "--include", "mean", "bos",
                                   "per_tok", "--repr-layers", *LAYERS, "--report", report)) == 0
    assert "on cpu in bf16 (--dtype bf16 as requested)" in capsys.readouterr().err
    assert json.loads(report.read_text())["compute_dtype_reason"] == "--dtype bf16 as requested"
    model, alphabet = fair_esm_tiny
    expected = fair_esm_tokens(model, alphabet, [seq for _, seq in records], LAYERS)  # BOS, then the residues
    with h5py.File(out, "r") as f:
        assert f.attrs["compute_dtype"] == "bf16"
        offsets = f["per_tok/offsets"][()]
        for layer in LAYERS:
            theirs_bos = np.stack([rows[layer][0] for rows in expected])
            theirs_mean = np.stack([rows[layer][1:].mean(0) for rows in expected])
            assert lowest_cosine(f[f"bos/layer_{layer}"][()], theirs_bos) >= 0.999
            assert lowest_cosine(f[f"mean/layer_{layer}"][()], theirs_mean) >= 0.999
            per_tok = f[f"per_tok/layer_{layer}"][()]
            for row, rows in enumerate(expected):
                assert lowest_cosine(per_tok[offsets[row]:offsets[row + 1]], rows[layer][1:]) >= 0.999
        # bf16 indeed: not fp32's agreement (<= 1e-4) with fair-esm
        assert np.abs(f["mean/layer_2"][()] - np.stack([rows[2][1:].mean(0) for rows in expected])).max() > 1e-4


def test_auto_takes_the_dtype_this_cpu_calls_for_on_every_rank_and_says_why(tmp_path, tiny_model_path, phage_dir):
    fasta, out, report = (write_fasta(tmp_path / "in.fasta", phage_sample(phage_dir, 6, long=0)),
                          tmp_path / "out.h5", tmp_path / "report.json")
    done = run_extract(job_args(tiny_model_path, fasta, out, "--dtype", "auto", "--report", report), nproc=2)
    assert done.returncode == 0, done.stderr
    rule = choose_dtype("auto", torch.device("cpu"))  # this machine's: with AMX bf16, else fp32
    assert rule.reason.startswith("auto: this CPU has")
    assert f"on cpu in {dtype_name(rule.dtype)} ({rule.reason})" in done.stderr
    assert json.loads(report.read_text())["compute_dtype_reason"] == rule.reason
    with h5py.File(out, "r") as f:
        assert f.attrs["compute_dtype"] == dtype_name(rule.dtype)
