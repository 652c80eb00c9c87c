import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from Bio.SeqIO.FastaIO import SimpleFastaParser

from cluster_jobs import SMALL_JOB_FLAGS, run_on_terminal
from extract.models.esm2.checkpoints import build_random_esm2, fair_esm_checkpoint
from jobs import clean_env, extract_command, write_fasta
from long_job import LongJob

# The real phage proteins, beside the checkout (or where ESM_FEATURES_PHAGE_DIR says, e.g. on a GPU machine).
PHAGE_DIR = Path(os.environ.get("ESM_FEATURES_PHAGE_DIR")
                 or Path(__file__).resolve().parents[2] / "shared" / "data" / "phage")

# fair-esm's reference forward runs in the test process itself: on a loaded machine, more intra-op threads
# than free cores make it many times slower (spinning threads wait for each other).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random ESM-2 saved in fair-esm's own `.pt` layout."""
    path = tmp_path_factory.mktemp("model") / "tiny_esm2.pt"
    torch.save(fair_esm_checkpoint(build_random_esm2(2, 64, 4, seed=1)), path)
    return path


@pytest.fixture(scope="session")
def phage_dir() -> Path:
    if not PHAGE_DIR.is_dir():
        pytest.skip(f"real phage data not found at {PHAGE_DIR}")
    return PHAGE_DIR


def _minor_capsids(phage_dir: Path, count: int, max_length: int) -> list[tuple[str, str]]:
    with open(phage_dir / "minor_capsid.fasta") as handle:
        return [(title.split()[0], seq) for title, seq in SimpleFastaParser(handle) if len(seq) <= max_length][:count]


@pytest.fixture(scope="session")
def capsid_fasta(tmp_path_factory, phage_dir) -> Path:
    """16 real minor-capsid proteins of at most 400 residues, in their file's order."""
    return write_fasta(tmp_path_factory.mktemp("capsid") / "capsid.fasta", _minor_capsids(phage_dir, 16, 400))


@pytest.fixture(scope="session")
def many_capsids_fasta(tmp_path_factory, phage_dir) -> Path:
    """120 real minor-capsid proteins: a job long enough to be stopped half-way."""
    return write_fasta(tmp_path_factory.mktemp("capsids") / "capsids.fasta", _minor_capsids(phage_dir, 120, 1022))


@pytest.fixture(scope="session")
def single_process_run(tmp_path_factory, tiny_model_path, capsid_fasta) -> SimpleNamespace:
    """One plain process embedding `capsid_fasta`, its stderr on a terminal, with a run report."""
    where = tmp_path_factory.mktemp("single")
    out, report = where / "single.h5", where / "single.json"
    code, terminal = run_on_terminal(
        extract_command(["--model", tiny_model_path, "--fasta", capsid_fasta, "--out", out, "--report", report,
                         *SMALL_JOB_FLAGS]), clean_env())
    assert code == 0, terminal
    return SimpleNamespace(out=out, report=report, terminal=terminal)


@pytest.fixture(scope="session")
def long_job(tmp_path_factory, tiny_model_path) -> LongJob:
    """Hundreds of one-row batches to interrupt, with the uninterrupted result to compare against."""
    return LongJob.prepare(tmp_path_factory.mktemp("long_job"), tiny_model_path)


@pytest.fixture
def small_file_system(tmp_path):
    """A real 1 MiB file system (tmpfs); needs root, as in this project's sandbox and CI containers."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)
