"""launch/benchmark.py: fair-esm's extract workflow, ours and the installed peers on the same input and weights."""

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import time

import pytest

from crafted_checkpoints import code_running_fair_esm_pt
from jobs import REPO, clean_env, phage_sample, write_fasta
from launch import benchmark
from launch.benchmark_peers import OLDEST_MAJOR, PEERS, missing_module  # where a peer cannot run, it says why

# How close each is to fair-esm in fp32, as (max abs difference, lowest cosine) of the mean embeddings:
# esm.cpp's int8 weights, quantised without calibration, are the only ones not exact.
CLOSE = {"esm-features": (1e-4, 0.99999), "transformers": (1e-4, 0.99999), "esm-cpp": (1e-4, 0.99999),
         "esm-cpp-int8": (0.1, 0.99)}


def _why_not(peer: str) -> str:
    module = PEERS[peer]
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install -e '.[bench]')"
    version = importlib.metadata.version(module)
    return f"{module} {version} is older than {OLDEST_MAJOR[module]} (pip install -e '.[bench]')"


def test_the_benchmark_runs_every_tool_and_checks_each_against_fair_esms_output(tmp_path, tiny_model_path,
                                                                                phage_dir):
    records = phage_sample(phage_dir, 8, long=1)  # the one longer than 1022 residues last ...
    fasta = write_fasta(tmp_path / "in.fasta", records[-1:] + records[:-1])  # ... put first, within --limit
    done = subprocess.run([sys.executable, str(REPO / "launch" / "benchmark.py"), "--model", str(tiny_model_path),
                           "--fasta", str(fasta), "--limit", "6", "--threads", "1", "--rounds", "1",
                           "--dtype", "fp32", "--workdir", str(tmp_path / "work")],
                          env=clean_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    setup, *lines = (json.loads(line) for line in done.stdout.splitlines())
    assert setup["model"]["proteins"] == 6 and setup["model"]["layers"] == 2
    assert setup["dtype"] == "fp32" and setup["dtype_reason"] == "--dtype fp32 as requested"
    installed = [peer for peer in PEERS if missing_module(peer) is None]
    skipped = {line["tool"]: line["skipped"] for line in lines if "skipped" in line}
    assert skipped == {peer: _why_not(peer) for peer in PEERS if peer not in installed}
    rows = [line for line in lines if "skipped" not in line]
    fair_esm, ours, *peers = rows
    assert fair_esm["tool"] == "fair-esm extract (fp32)" and ours["tool"] == "esm-features (fp32)"
    assert len(peers) == len(installed)
    report = json.loads((tmp_path / "work" / "report.json").read_text())  # compute: the batches, not the loading
    assert ours["compute_s"] == round(report["ranks"][0]["seconds"], 2) < round(report["total"]["seconds"], 2)
    assert 0 < ours["padding_share"] < 0.05  # packed: only BOS and EOS besides the residues
    for tool, row in zip(["esm-features", *installed], [ours, *peers]):
        assert row["x_fair_esm"] == round(fair_esm["process_s"] / row["process_s"], 2)
        assert row["ours_x"] == round(row["process_s"] / ours["process_s"], 2)
        largest_difference, lowest_cosine = CLOSE[tool]
        assert row["agreement_with_fair_esm"]["proteins"] == 6, tool
        assert row["agreement_with_fair_esm"]["max_abs_diff"] <= largest_difference, tool
        assert row["agreement_with_fair_esm"]["min_cosine"] >= lowest_cosine, tool
    if "transformers" in installed:
        assert peers[0]["tool"].endswith("EsmModel, SDPA (fp32)")
        assert peers[0]["padding_share"] == fair_esm["padding_share"]  # fair-esm's batches


def test_a_peer_still_running_at_the_peer_timeout_is_stopped_and_left_out_with_a_line(tmp_path, tiny_model_path,
                                                                                     phage_dir):
    fasta = write_fasta(tmp_path / "in.fasta", phage_sample(phage_dir, 2, long=0))  # transformers: a test extra
    done = subprocess.run([sys.executable, str(REPO / "launch" / "benchmark.py"), "--model", str(tiny_model_path),
                           "--fasta", str(fasta), "--threads", "1", "--rounds", "2", "--dtype", "fp32",
                           "--peers", "transformers", "--peer-timeout", "0.2", "--workdir", str(tmp_path / "work")],
                          env=clean_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    _, *lines = (json.loads(line) for line in done.stdout.splitlines())
    assert lines[0] == {"tool": "transformers", "stopped": "still running after 0.2 s (--peer-timeout): stopped"}
    assert [line["tool"] for line in lines[1:]] == ["fair-esm extract (fp32)", "esm-features (fp32)"]
    worker_runs = [out for out in (tmp_path / "work").iterdir() if out.name.startswith("tmp")]
    assert len(worker_runs) == 3  # fair-esm twice, the peer in the first round only


def test_whole_process_kills_a_process_at_its_timeout():
    started = time.perf_counter()
    with pytest.raises(benchmark.PeerTimedOut, match=r"^still running after 1 s \(--peer-timeout\): stopped$"):
        benchmark.whole_process([sys.executable, "-c", "import time; time.sleep(60)"], threads=1, timeout=1)
    assert time.perf_counter() - started < 30


def test_a_model_whose_loading_would_run_code_is_refused_in_one_line_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "marker"
    crafted = code_running_fair_esm_pt(tmp_path / "crafted.pt", marker)
    fasta = write_fasta(tmp_path / "in.fasta", [("p1", "MKV")])
    assert benchmark.main(["--model", str(crafted), "--fasta", str(fasta), "--workdir", str(tmp_path / "work")]) == 2
    assert capsys.readouterr().err == (
        f"benchmark: error: model {crafted}: refused: it holds more than weights and settings (Unsupported global: "
        f"GLOBAL io.open was not an allowed global by default), and loading it would run code from the file; save "
        f"the weights alone (a state dict, or safetensors)\n")
    assert not marker.exists()
