"""The output is safe from a second job, from a full disk, and from a model that cannot be used."""

import os
import resource
import signal
import socket

import h5py
import pytest
import torch

from extract.models.esm2.checkpoints import ESM2_ARCHITECTURES
from extract.output.lock import lock_path
from job_control import start_extract, wait_for_done_rows
from jobs import job_args, random_proteins, run_in_process, write_fasta
from long_job import LAYER


def test_a_second_job_on_the_same_output_is_refused(tmp_path, long_job, capsys):
    out = tmp_path / "out.h5"
    first = start_extract(long_job.args(out))
    wait_for_done_rows(out, first, 10)
    first.send_signal(signal.SIGSTOP)  # hold the first job mid-run, its lock held
    try:
        second = run_in_process(long_job.args(out))
        second_overwriting = run_in_process(long_job.args(out, "--overwrite"))
    finally:
        first.send_signal(signal.SIGCONT)
    _, first_err = first.communicate(timeout=120)

    refusal = f"esm_features: error: {out}: in use by another job (pid {first.pid} on {socket.gethostname()} since "
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("esm_features:")]
    assert (second, second_overwriting) == (2, 2)
    assert len(lines) == 2 and all(line.startswith(refusal) for line in lines), lines
    assert all(line.endswith("); wait for it to end or choose another --out") for line in lines)
    assert first.returncode == 0, first_err  # the first job did not notice
    long_job.assert_complete_and_equal(out)
    assert not lock_path(out).exists()


def _writes_fail_mid_run_then_rerun_resumes(long_job, out, block_writes, reason):
    long_job.fail_mid_run_then_resume(out, block_writes, f"{out}: cannot write rows ({reason}); every row marked "
                                      f"done so far is kept; free space (or raise the file-size limit) and rerun "
                                      f"the same command to resume")


def test_a_full_disk_stops_the_job_and_a_rerun_resumes(small_file_system, long_job):
    out = small_file_system / "out.h5"
    filler = small_file_system / "filler"

    def fill_the_disk(_job):  # another process takes the room the output's rows were to use
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        with pytest.raises(OSError, match="No space left on device"):
            while True:
                os.write(fd, bytes(4096))
        os.close(fd)
        return filler.unlink

    _writes_fail_mid_run_then_rerun_resumes(long_job, out, fill_the_disk, "No space left on device")


def test_a_file_size_limit_stops_the_job_and_a_rerun_resumes(tmp_path, long_job):
    out = tmp_path / "out.h5"

    def limit_the_file_size(job):  # as `ulimit -f`: no write past the start of the embeddings
        with h5py.File(out, "r", locking=False) as f:
            first_row_byte = f[LAYER].id.get_offset()
        resource.prlimit(job.pid, resource.RLIMIT_FSIZE, (first_row_byte, first_row_byte))
        return lambda: None  # the rerun is a new process, without the limit

    _writes_fail_mid_run_then_rerun_resumes(long_job, out, limit_the_file_size, "File too large")


def _unusable_models(folder, tiny_model_path):
    (folder / "garbage.pt").write_bytes(b"#!/bin/sh\necho not a model\n" * 10)
    data = tiny_model_path.read_bytes()
    (folder / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"weights": torch.zeros(3)}, folder / "other.pt")
    checkpoint = torch.load(tiny_model_path, weights_only=False)
    weights = checkpoint["model"]
    del weights["layers.1.fc2.bias"]
    weights["layers.0.fc1.weight"] = torch.zeros(3, 3)
    weights["encoder.extra.weight"] = torch.zeros(2)
    torch.save(checkpoint, folder / "damaged.pt")
    return {
        "garbage": (folder / "garbage.pt", "not a readable PyTorch checkpoint (invalid load key, '#')"),
        "truncated": (folder / "truncated.pt", "not a readable PyTorch checkpoint (PytorchStreamReader failed "
                                               "reading zip archive: failed finding central directory)"),
        "not ESM-2": (folder / "other.pt", "not a fair-esm ESM-2 checkpoint (no 'cfg' and 'model')"),
        "missing": (folder / "missing.pt", "no such file or directory, and not a fair-esm ESM-2 name"),
        "damaged": (folder / "damaged.pt", 'not a usable ESM-2 checkpoint (Missing key(s) in state_dict: '
                                           '"layers.1.fc2.bias"; Unexpected key(s) in state_dict: "extra.weight"; '
                                           'size mismatch for layers.0.fc1.weight: copying a param with shape '
                                           'torch.Size([3, 3]) from checkpoint, the shape in current model is '
                                           'torch.Size([256, 64]))'),
        "unknown random": ("random:esm2_t99_1T", "unknown ESM-2 name; choose one of esm2_t6_8M_UR50D, "),
    }


@pytest.mark.parametrize("case", ["garbage", "truncated", "not ESM-2", "damaged", "missing", "unknown random"])
def test_an_unusable_model_is_refused_before_any_work(tmp_path, tiny_model_path, capsys, case):
    model, problem = _unusable_models(tmp_path, tiny_model_path)[case]
    fasta = write_fasta(tmp_path / "in.fasta", random_proteins(3, max_len=30))
    out = tmp_path / "out" / "out.h5"
    out.parent.mkdir()
    code = run_in_process(job_args(model, fasta, out))
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"esm_features: error: model {model}: {problem}"), err
    assert "Traceback" not in err
    assert list(out.parent.iterdir()) == []


def test_a_bad_model_is_refused_before_the_inputs_are_read(tmp_path, capsys):
    out = tmp_path / "out.h5"
    code = run_in_process(job_args(tmp_path / "missing.pt", tmp_path / "missing.fasta", out))
    assert code == 2
    assert capsys.readouterr().err.strip() == (f"esm_features: error: model {tmp_path / 'missing.pt'}: no such file "
                                               f"or directory, and not a fair-esm ESM-2 name "
                                               f"({', '.join(ESM2_ARCHITECTURES)}), a Hugging Face repo id "
                                               f"(owner/name[@revision]) or random:<name>")
    assert list(tmp_path.iterdir()) == []
