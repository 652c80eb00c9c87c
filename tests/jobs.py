"""Starting the real job from tests: plain python or torchrun, in a subprocess."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

from Bio.SeqIO.FastaIO import SimpleFastaParser

from extract.data.fasta import Alphabet
from extract.esm_features import main
from extract.models.esm2.embedder import Esm2Embedder

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "extract" / "esm_features.py"
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
# Tests compare jobs with fair-esm's fp32 forward: they run in fp32 unless they name a --dtype (a later --dtype
# overrides this one), as `auto` is bf16 on CPUs with AMX.
FP32 = ("--dtype", "fp32")
ESM2_ALPHABET = Alphabet(Esm2Embedder.alphabet, Esm2Embedder.alphabet_name)  # what the command reads ESM-2's input with


def clean_env() -> dict:
    """The environment for a job: one thread per process, no torchrun variables inherited."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def job_args(model, fasta: Path | list[Path], out: Path, *extra) -> list[str]:
    """The command's arguments embedding `fasta` (one path or a list) with `model` into `out`, then `extra`."""
    files = fasta if isinstance(fasta, (list, tuple)) else [fasta]
    return [str(a) for a in ("--model", model, "--fasta", *files, "--out", out, *extra)]


def extract_command(args: list, nproc: int | None = None, script: Path = SCRIPT) -> list[str]:
    """`python extract/esm_features.py ARGS` (or another `script`), or under `torchrun --standalone` with
    `nproc` ranks (in fp32 unless ARGS name a --dtype)."""
    args = [*(FP32 if script == SCRIPT else ()), *(str(a) for a in args)]
    if nproc is None:
        return [sys.executable, str(script), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(script), *args]


def run_extract(args: list, nproc: int | None = None, timeout: float = 300, extra_env: dict | None = None,
                script: Path = SCRIPT, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(extract_command(args, nproc, script), env={**clean_env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def run_in_process(args: list) -> int:
    """The command's `main(ARGS)` in this process, in fp32 as `extract_command` runs it: a job whose point is
    not its process, without the start of one."""
    return main([*FP32, *args])


def process_tree(pid: int) -> list[int]:
    """`pid` and every process descended from it (torchrun starts its workers in sessions of their own)."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
        except OSError:  # it ended meanwhile
            continue
    tree = [pid]
    for member in tree:
        tree += [child for child, parent in parents.items() if parent == member]
    return tree


def write_fasta(path: Path, records: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f">{rid} test protein\n{seq}\n" for rid, seq in records))
    return path


def random_proteins(count: int, seed: int = 0, min_len: int = 5, max_len: int = 300) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(f"prot{seed}_{i}", "".join(rng.choices(AMINO_ACIDS, k=rng.randint(min_len, max_len))))
            for i in range(count)]


def phage_sample(phage_dir: Path, count: int, long: int) -> list[tuple[str, str]]:
    """`count` tail-fibre proteins, `long` of them longer than ESM-2's 1022-residue window."""
    with open(phage_dir / "tail_fiber.fasta") as handle:
        records = [(title.split()[0], seq) for title, seq in SimpleFastaParser(handle)]
    longer = [r for r in records if len(r[1]) > 1022][:long]
    shorter = [r for r in records if len(r[1]) <= 1022][: count - len(longer)]
    return shorter + longer
