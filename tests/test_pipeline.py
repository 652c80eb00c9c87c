"""The job's host side runs on threads of its own (sequences read and tokenised ahead of the model, rows
written behind it); what goes wrong there ends the job as it would without them: one line, its exit code,
every row marked done correct."""

import shutil
import signal

from extract import input_index
from extract.output_lock import lock_path
from job_control import start_extract, wait_for_done_rows
from jobs import run_extract
from long_job import read_output


def test_an_input_index_damaged_mid_run_stops_the_job_with_one_line(tmp_path, long_job):
    out = tmp_path / "out.h5"
    index = input_index.directory_for(out)
    sequences = index / input_index.SEQUENCES
    job = start_extract(long_job.args(out))
    wait_for_done_rows(out, job, 10)
    job.send_signal(signal.SIGSTOP)
    sequences.write_bytes(b"")  # the batches not yet read can no longer be
    job.send_signal(signal.SIGCONT)
    _, err = job.communicate(timeout=120)

    assert job.returncode == 1
    assert err.strip().splitlines()[-1] == (
        f"esm_features: error: {sequences}: ends before the sequences it should hold; the input index is "
        f"damaged: remove {index} and rerun the same command to resume")
    assert "Traceback" not in err
    assert not lock_path(out).exists()
    assert read_output(out)["status"] == "incomplete"
    done = long_job.assert_done_rows_correct(out)
    assert 10 <= done.sum() < done.size

    shutil.rmtree(index)
    rerun = run_extract(long_job.args(out))
    assert rerun.returncode == 0, rerun.stderr
    assert f"rows: {done.size - done.sum():,} to write" in rerun.stderr
    long_job.assert_complete_and_equal(out)
