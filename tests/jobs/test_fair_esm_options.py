"""fair-esm extract's command line: its spellings are our options, its positional form gets our command.

In-process through `main(argv)`, as in test_bad_input.py.
"""

import json
import shlex

import h5py
import numpy as np
import pytest

from extract import export
from extract.esm_features import create_parser, main
from fair_esm_reference import fair_esm_extract, fair_esm_means
from jobs import job_args, phage_sample, run_in_process, write_fasta
from output_checks import assert_same_as_fair_esms_files

REQUIRED = job_args("m.pt", "in.fasta", "out.h5")


def test_fair_esms_spellings_parse_as_our_options():
    fair_esms = create_parser().parse_args(REQUIRED + ["--repr_layers", "0", "-1", "--toks_per_batch", "300",
                                                       "--truncation_seq_length", "30", "--nogpu"])
    ours = create_parser().parse_args(REQUIRED + ["--repr-layers", "0", "-1", "--toks-per-batch", "300",
                                                  "--truncation-seq-length", "30", "--device", "cpu"])
    assert vars(fair_esms) == vars(ours)
    assert (ours.repr_layers, ours.toks_per_batch, ours.truncation_seq_length, ours.device) == ([0, -1], 300, 30, "cpu")


def test_a_job_in_fair_esms_spellings_gives_fair_esms_means(tmp_path, tiny_model_path, fair_esm_tiny, phage_dir):
    records = phage_sample(phage_dir, 6, long=1)
    fasta, out = write_fasta(tmp_path / "in.fasta", records), tmp_path / "out.h5"
    assert run_in_process(job_args(tiny_model_path, fasta, out, "--repr_layers", "0", "-1", "--toks_per_batch", "300",
                         "--truncation_seq_length", "30", "--nogpu")) == 0
    model, alphabet = fair_esm_tiny
    expected = fair_esm_means(model, alphabet, [seq for _, seq in records], [0, 2], truncation_seq_length=30)
    with h5py.File(out) as f:
        assert (f.attrs["truncation_seq_length"], f.attrs["toks_per_batch"]) == (30, 300)
        assert json.loads(f.attrs["last_run"])["ranks"][0]["device"] == "cpu"
        for layer in (0, 2):
            assert np.abs(f[f"mean/layer_{layer}"][:] - expected[layer]).max() <= 1e-5


@pytest.mark.parametrize("flags", [["--nogpu", "--device", "cuda"], ["--device", "cuda", "--nogpu"]])
def test_nogpu_with_device_cuda_is_refused_in_one_line(tmp_path, capsys, flags):
    out = tmp_path / "out.h5"
    assert run_in_process(job_args("m.pt", "in.fasta", out, *flags)) == 2
    assert capsys.readouterr().err == "esm_features: error: --nogpu and --device cuda contradict each other; " \
                                      "give one of them\n"
    assert not out.exists()


def _suggested(err: str) -> tuple[list[str], list[str]]:
    """The two commands of the positional form's line: the job, then the export."""
    job, export_part = err.split("writes one HDF5 file: ", 1)[1].split(" (then, for fair-esm's .pt files: ")
    return shlex.split(job), shlex.split(export_part.removesuffix(")\n"))


def test_fair_esms_positional_form_gets_the_equivalent_command_which_gives_fair_esms_files(tmp_path, capsys,
                                                                                           tiny_model_path,
                                                                                           phage_dir):
    fasta = tmp_path / "some proteins.fasta"
    fasta.write_text("".join(f">{rid}\n{seq}\n" for rid, seq in phage_sample(phage_dir, 5, long=1)))
    output_dir = tmp_path / "emb"
    fair_esms_form = [str(tiny_model_path), str(fasta), f"{output_dir}/", "--repr_layers", "0", "-1",
                      "--include", "mean", "per_tok", "--nogpu"]
    assert main(fair_esms_form) == 2
    err = capsys.readouterr().err
    out = f"{output_dir}.h5"
    assert err == (f"esm_features: error: this is fair-esm's form MODEL FASTA OUTPUT_DIR; esm-features writes one "
                   f"HDF5 file: esm-features --model {tiny_model_path} --fasta '{fasta}' --out {out} --repr-layers 0 "
                   f"-1 --include mean per_tok --device cpu (then, for fair-esm's .pt files: esm-features-export "
                   f"{out} --fair-esm-dir {output_dir}/)\n")
    assert not output_dir.exists()

    job, exporter = _suggested(err)
    assert run_in_process(job[1:]) == 0 and export.main(exporter[1:]) == 0
    fair_esm_extract(tiny_model_path, fasta, tmp_path / "fair_esm", [0, -1], ["mean", "per_tok"])
    assert_same_as_fair_esms_files(output_dir, tmp_path / "fair_esm", layers=[0, 2])
