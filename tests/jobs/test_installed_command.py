"""The commands `pip install` puts beside the Python that runs the tests: esm-features and esm-features-export."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import clean_env, job_args
from output_checks import assert_complete_and_like_fair_esm

BIN = Path(sys.executable).parent


def _installed(name: str) -> Path:
    script = BIN / name
    assert script.is_file(), f"{script} is missing: install the package (pip install -e .) into this environment"
    return script


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    env = {**clean_env(), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([str(arg) for arg in command], env=env, capture_output=True, text=True, timeout=300,
                          **kwargs)


@pytest.mark.parametrize("ranks", [None, 2], ids=["plain", "torchrun"])
def test_the_installed_command_runs_the_job(tmp_path, tiny_model_path, fair_esm_tiny, capsid_fasta, ranks):
    out = tmp_path / "out.h5"
    command = [_installed("esm-features"), *job_args(tiny_model_path, capsid_fasta, out)]
    if ranks:  # torchrun starts the command found on the PATH itself
        command = [_installed("torchrun"), "--no-python", "--standalone", f"--nproc_per_node={ranks}",
                   "esm-features", *command[1:]]
    done = _run(command, cwd=tmp_path)  # away from the checkout: the installed command, not extract/ beside it
    assert done.returncode == 0, done.stderr
    assert f"[rank 0/{ranks or 1}]" in done.stderr
    assert_complete_and_like_fair_esm(out, [capsid_fasta], fair_esm_tiny)


def test_the_installed_export_writes_a_file_per_protein(tmp_path, tiny_model_path, capsid_fasta):
    out = tmp_path / "out.h5"
    assert _run([_installed("esm-features"), *job_args(tiny_model_path, capsid_fasta, out, "--device", "cpu")]
                ).returncode == 0
    done = _run([_installed("esm-features-export"), out, "--fair-esm-dir", tmp_path / "pt"])
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{out}: 16 proteins exported to {tmp_path / 'pt'}, one <id>.pt each\n"
    assert len(list((tmp_path / "pt").glob("*.pt"))) == 16


def test_the_installed_command_refuses_bad_usage_in_one_line(tmp_path):
    done = _run([_installed("esm-features"), "esm2_t33_650M_UR50D", "in.fasta", "out_dir/", "--include", "mean"])
    assert done.returncode == 2
    assert done.stderr == ("esm_features: error: this is fair-esm's form MODEL FASTA OUTPUT_DIR; esm-features writes "
                           "one HDF5 file: esm-features --model esm2_t33_650M_UR50D --fasta in.fasta --out out_dir.h5 "
                           "--include mean (then, for fair-esm's .pt files: esm-features-export out_dir.h5 "
                           "--fair-esm-dir out_dir/)\n")
