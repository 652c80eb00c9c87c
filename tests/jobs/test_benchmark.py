"""launch/benchmark.py: fair-esm's extract workflow and ours on the same input and weights."""

import json
import subprocess
import sys

from jobs import REPO, clean_env, phage_sample, write_fasta


def test_the_benchmark_runs_both_tools_and_checks_ours_against_fair_esms_output(tmp_path, tiny_model_path,
                                                                                phage_dir):
    records = phage_sample(phage_dir, 8, long=1)  # the one longer than 1022 residues last ...
    fasta = write_fasta(tmp_path / "in.fasta", records[-1:] + records[:-1])  # ... put first, within --limit
    done = subprocess.run([sys.executable, str(REPO / "launch" / "benchmark.py"), "--model", str(tiny_model_path),
                           "--fasta", str(fasta), "--limit", "6", "--threads", "1", "--rounds", "1",
                           "--workdir", str(tmp_path / "work")],
                          env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    setup, fair_esm, ours, agreement = (json.loads(line) for line in done.stdout.splitlines())
    assert setup["model"]["proteins"] == 6 and setup["model"]["layers"] == 2
    assert fair_esm["tool"] == "fair-esm extract (fp32)" and ours["tool"] == "esm-features (fp32)"
    assert ours["speedup_process"] == round(fair_esm["process_s"] / ours["process_s"], 2)
    report = json.loads((tmp_path / "work" / "report.json").read_text())  # compute: the batches, not the loading
    assert ours["compute_s"] == round(report["ranks"][0]["seconds"], 2) < round(report["total"]["seconds"], 2)
    assert 0 < ours["padding_share"] < 0.05  # packed: only BOS and EOS besides the residues
    assert agreement["agreement_with_fair_esm"]["proteins"] == 6
    assert agreement["agreement_with_fair_esm"]["max_abs_diff"] <= 1e-4
