"""extract.esm_features.main(argv) inside a job that already runs a process group."""

import json
import subprocess
import sys
from pathlib import Path

from jobs import FP32, clean_env, job_args, phage_sample, write_fasta
from output_checks import assert_complete_and_like_fair_esm

DRIVER = Path(__file__).resolve().parents[1] / "in_process_driver.py"


def test_main_uses_the_callers_group_repeatedly_and_leaves_it_initialised(tmp_path, tiny_model_path, fair_esm_tiny,
                                                                           capsid_fasta, phage_dir):
    tails = write_fasta(tmp_path / "tails.fasta", phage_sample(phage_dir, 6, long=0))
    first, second = tmp_path / "capsid.h5", tmp_path / "tails.h5"
    calls = [
        [*FP32, *job_args(tiny_model_path, capsid_fasta, first)],
        [*FP32, *job_args(tiny_model_path, tails, second)],
        [*FP32, *job_args(tiny_model_path, capsid_fasta, first)],  # complete
        job_args(tiny_model_path, tmp_path / "missing.fasta", tmp_path / "x.h5"),
        job_args("m", "f", "o", "--no-such-flag"),
    ]
    (tmp_path / "calls.json").write_text(json.dumps(calls))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(DRIVER), str(tmp_path / "calls.json"), str(tmp_path / "result")],
                          env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for rank in (0, 1):
        result = json.loads((tmp_path / f"result.rank{rank}.json").read_text())
        assert result == {"codes": [0, 0, 0, 2, 2], "initialized": True, "sum": 3, "threads_left": 0}
    assert "[rank 1/2]" in done.stderr and f"{first} is already complete; nothing to do" in done.stderr
    assert f"esm_features: error: {tmp_path / 'missing.fasta'}: no such file" in done.stderr
    assert "esm_features: error: unrecognized arguments: --no-such-flag" in done.stderr
    assert_complete_and_like_fair_esm(first, [capsid_fasta], fair_esm_tiny)
    assert_complete_and_like_fair_esm(second, [tails], fair_esm_tiny)


def test_a_rank_stopped_while_its_peer_finishes_stops_both_and_the_group_stays_usable(tmp_path, tiny_model_path,
                                                                                         fair_esm_tiny, capsid_fasta):
    """Rank 1 (one batch) is asked to stop and waits at a barrier for rank 0 (at the last one while rank 0
    marks the file, at the latest): it must not leave alone with rank 0 going on into a collective, or the
    next call hangs."""
    out = tmp_path / "capsid.h5"
    job = [*FP32, *job_args(tiny_model_path, capsid_fasta, out)]
    (tmp_path / "calls.json").write_text(json.dumps([job, job]))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(DRIVER), str(tmp_path / "calls.json"), str(tmp_path / "result")],
                          env={**clean_env(), "STOP_RANK_1_IN_ITS_FIRST_BATCH": "1"}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("1 of the batches are this rank's") == 2  # so rank 1's next stop is at a barrier
    for rank in (0, 1):
        result = json.loads((tmp_path / f"result.rank{rank}.json").read_text())
        assert result == {"codes": [143, 0], "initialized": True, "sum": 3, "threads_left": 0}
    assert_complete_and_like_fair_esm(out, [capsid_fasta], fair_esm_tiny)
