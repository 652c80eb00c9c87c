"""--report: what a run did and used, per rank and in total, in a JSON file and in the output."""

import importlib.metadata
import json

import h5py
import pytest

from extract.data.fasta import read_inputs
from jobs import ESM2_ALPHABET, job_args, run_in_process


def test_report_of_a_single_process_run(single_process_run, capsid_fasta):
    report = json.loads(single_process_run.report.read_text())
    inputs = read_inputs([capsid_fasta], ESM2_ALPHABET)
    assert report["status"] == "complete" and report["out"] == str(single_process_run.out)
    (rank,) = report["ranks"]
    total = report["total"]
    assert (rank["rank"], rank["device"], rank["rows"]) == (0, "cpu", 16)
    assert total["rows"] == total["rows_in_file"] == 16 and total["ranks"] == 1
    assert rank["residues"] == total["residues"] == int(inputs.lengths.sum())
    # Packed on the CPU: the tokens computed are the residues, BOS and EOS, and no padding.
    assert total["residues_embedded"] == total["residues_computed"]  # none longer than the window
    assert rank["tokens"] == total["tokens"] == total["residues_embedded"] + 2 * total["rows_computed"]
    assert total["residue_share_of_tokens"] == round(total["residues_embedded"] / total["tokens"], 4)
    assert f"{100 * total['residue_share_of_tokens']:.1f}% of the computed tokens were residues" in \
        single_process_run.terminal
    assert rank["peak_host_bytes"] == total["peak_host_bytes"] > 0 and total["peak_device_bytes"] is None
    assert total["seconds"] >= rank["seconds"] > 0 and rank["residues_per_second"] > 0
    assert (total["oom_split_batches"], total["failed_rows"]) == (0, 0)
    with h5py.File(single_process_run.out, "r") as f:
        file_settings = {name: f.attrs[name] for name in ("model", "random_weights", "compute_dtype", "storage_dtype",
                                                          "truncation_seq_length", "toks_per_batch")}
        stored = json.loads(f.attrs["last_run"])
    assert {name: report["settings"][name] for name in file_settings} == file_settings
    assert (report["settings"]["repr_layers"], report["settings"]["include"]) == ([2], ["mean", "per_tok"])
    assert report["settings"]["world_size"] == 1 and report["settings"]["toks_per_batch"] == 500
    assert report["arguments"][report["arguments"].index("--toks-per-batch") + 1] == "500"
    for package in ("torch", "fair-esm", "h5py", "numpy", "biopython", "safetensors"):
        assert report["versions"][package] == importlib.metadata.version(package)
    assert stored == {k: v for k, v in report.items() if k not in ("status", "out")}


@pytest.mark.parametrize("where, problem", [("no_such_dir/report.json", "cannot write a file in {parent}"),
                                            ("a_dir", "is a directory; name a file in it")])
def test_a_report_that_cannot_be_written_is_refused_before_any_work(tmp_path, tiny_model_path, capsid_fasta, capsys,
                                                                     where, problem):
    out, report = tmp_path / "out.h5", tmp_path / where
    (tmp_path / "a_dir").mkdir()
    assert run_in_process(job_args(tiny_model_path, capsid_fasta, out, "--report", report)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (f"esm_features: error: --report {report}: "
                                                    f"{problem.format(parent=report.parent)}")
    assert not out.exists()
