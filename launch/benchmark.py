"""Benchmark: esm-features against fair-esm's extract workflow and its peers, side by side, on the same input
and weights.

    python launch/benchmark.py --model random:esm2_t12_35M_UR50D --fasta F.fasta --limit 300 --threads 2

Each round runs every tool as a whole process, in turn (fair-esm, ours, then the peers), so that a shared,
noisy machine slows them alike. Each row gives a tool's medians, its speed against fair-esm's
(`x_fair_esm`: whole processes; `x_fair_esm_compute`: their batches alone), ours against it (`ours_x`), and
how far its mean embeddings are from those fair-esm saved (max abs difference, lowest cosine over the
proteins). fair-esm's side is its extract script's workflow driven through its library API:
FastaBatchedDataset, get_batch_indices, its batch converter, its model's forward, a mean per protein saved
with torch.save. `--fair-esm-autocast` runs that forward under bf16 autocast (the seed plan's approach).
The peers (launch/benchmark_peers.py; optional, `pip install -e '.[bench]'`, each skipped with a line where
it is not installed): transformers' EsmModel with SDPA in our dtype, esm.cpp in fp32 and in int8 (CPU only).
A peer still running after `--peer-timeout` seconds is stopped and left out (of the table and the later
rounds) with a line saying so: one that crawls on a CPU it was not built for does not hold up the others.
On a GPU the table adds tokens/s and the achieved TFLOP/s against the device's measured bf16 matrix peak.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # started as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from extract.data.fasta import Alphabet, read_inputs  # noqa: E402
from extract.errors import UserError  # noqa: E402
from extract.models.esm2.checkpoints import (  # noqa: E402
    RANDOM_PREFIX, fair_esm_checkpoint, load_model, read_fair_esm_checkpoint)
from extract.models.esm2.embedder import Esm2Embedder  # noqa: E402
from extract.reading import Embeddings  # noqa: E402
from extract.runtime.device import CPUINFO, choose_dtype, cpu_capabilities, dtype_name  # noqa: E402
from launch import benchmark_peers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ESM2_ALPHABET = Alphabet(Esm2Embedder.alphabet, Esm2Embedder.alphabet_name)
FAIR_ESM, OURS = "fair-esm", "esm-features"


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="random:<fair-esm name> or a fair-esm .pt")
    parser.add_argument("--fasta", required=True, type=Path)
    parser.add_argument("--limit", type=int, default=None, help="the first N proteins only")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each process")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="our compute dtype, and transformers' (auto: as the job picks it)")
    parser.add_argument("--peers", nargs="*", choices=list(benchmark_peers.PEERS), default=list(benchmark_peers.PEERS),
                        help="the peers to run besides fair-esm and ours (default: all; none: --peers alone)")
    parser.add_argument("--peer-timeout", type=float, default=None, metavar="SECONDS",
                        help="stop a peer's process after this long and leave the peer out (default: no limit)")
    parser.add_argument("--fair-esm-autocast", action="store_true", help="fair-esm under bf16 autocast")
    parser.add_argument("--toks-per-batch", type=int, default=4096, help="every tool's token budget")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    # fair-esm's worker process (the peers' is launch/benchmark_peers.py).
    parser.add_argument("--fair-esm-worker", type=Path, metavar="MODEL_PT", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    return parser


# ---- fair-esm's side: its extract workflow, in a process of its own --------------------------------


def fair_esm_extract(args: argparse.Namespace) -> dict:
    """fair-esm's extract.py loop: batches by its own planner, mean of the last layer per protein."""
    import esm
    from esm.data import FastaBatchedDataset

    data = read_fair_esm_checkpoint(args.fair_esm_worker)
    model, alphabet = esm.pretrained.load_model_and_alphabet_core("esm2", data)
    model = model.eval().to(args.device)
    dataset = FastaBatchedDataset.from_file(args.fasta)
    batches = dataset.get_batch_indices(args.toks_per_batch, extra_toks_per_seq=1)
    loader = torch.utils.data.DataLoader(dataset, collate_fn=alphabet.get_batch_converter(1022),
                                         batch_sampler=batches)
    layer = model.num_layers
    residues = padded = 0
    started = time.perf_counter()
    with torch.no_grad(), torch.autocast(args.device, torch.bfloat16, enabled=args.fair_esm_autocast):
        for labels, strs, toks in loader:
            toks = toks.to(args.device, non_blocking=True)
            reps = model(toks, repr_layers=[layer], return_contacts=False)["representations"][layer].to("cpu")
            padded += toks.numel()
            for i, label in enumerate(labels):
                length = min(1022, len(strs[i]))
                residues += length
                mean = reps[i, 1 : length + 1].mean(0).clone()
                torch.save({"label": label, "mean_representations": {layer: mean}},
                           args.out_dir / f"{label.split()[0]}.pt")
    if args.device == "cuda":
        torch.cuda.synchronize()
    return {"residues": residues, "tokens": padded, "seconds": time.perf_counter() - started,
            "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_device_bytes": torch.cuda.max_memory_allocated() if args.device == "cuda" else None}


# ---- the driver -------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace, workdir: Path) -> tuple[Path, Path, dict]:
    """One checkpoint file in fair-esm's layout (kept in `workdir` for the next run: random weights are
    seeded, so it is the same file every time) and one FASTA every tool reads."""
    shape_only = load_model(args.model, device=torch.device("meta"))
    model, model_path = shape_only.model, workdir / f"{shape_only.name}.pt"
    if not model_path.exists():
        torch.save(fair_esm_checkpoint(load_model(args.model).model), model_path)
    inputs = read_inputs([args.fasta], ESM2_ALPHABET)
    count = len(inputs) if args.limit is None else min(args.limit, len(inputs))
    fasta = workdir / "proteins.fasta"
    with open(fasta, "w") as out:
        for i in range(count):
            out.write(f">{inputs.ids[i]}\n{inputs.sequences[i]}\n")
    tokens_per_sequence = np.minimum(inputs.lengths[:count], 1022) + 2
    shape = {"name": model_path.stem, "layers": model.num_layers, "embed_dim": model.embed_dim,
             "random_weights": args.model.startswith(RANDOM_PREFIX), "proteins": count,
             "model_flops": model_flops(model.num_layers, model.embed_dim, tokens_per_sequence)}
    return model_path, fasta, shape


def runnable_peers(args: argparse.Namespace) -> tuple[list[str], list[dict]]:
    """The peers asked for that can run here, and a line for each of the others saying why not."""
    runnable, skipped = [], []
    for peer in args.peers:
        reason = benchmark_peers.missing_module(peer)
        if reason is None and peer.startswith("esm-cpp") and args.device != "cpu":
            reason = "esm.cpp runs on the CPU only"
        if reason is None:
            runnable.append(peer)
        else:
            skipped.append({"tool": peer, "skipped": reason})
    return runnable, skipped


def peer_inputs(peers: list[str], model_path: Path, fasta: Path, toks_per_batch: int, workdir: Path,
                dtype: str) -> dict:
    """Per peer, its options: the weights it loads (converted from the fair-esm checkpoint, once per
    checkpoint), and for transformers our dtype and the batches fair-esm's planner makes of the FASTA."""
    if not peers:
        return {}
    from esm.data import FastaBatchedDataset

    loaded = load_model(str(model_path))
    converted = workdir / f"{model_path.stem}_converted"
    weights = {"transformers": converted / "hugging_face", "esm-cpp": converted / "esm_cpp.safetensors"}
    if "transformers" in peers and not weights["transformers"].exists():
        benchmark_peers.save_hugging_face(loaded.model, loaded.alphabet, weights["transformers"])
    if any(peer.startswith("esm-cpp") for peer in peers) and not weights["esm-cpp"].exists():
        converted.mkdir(exist_ok=True)
        benchmark_peers.save_esm_cpp(loaded.model, weights["esm-cpp"])
    batches = workdir / "batches.json"
    batches.write_text(json.dumps(FastaBatchedDataset.from_file(fasta).get_batch_indices(toks_per_batch, 1)))
    return {peer: ["--weights", str(weights[peer.removesuffix("-int8")])]
            + (["--batches", str(batches), "--dtype", dtype] if peer == "transformers" else []) for peer in peers}


class PeerTimedOut(Exception):
    """A peer's process ran past --peer-timeout and was killed."""


def whole_process(command: list[str], threads: int, timeout: float | None = None) -> tuple[float, str]:
    """Wall seconds and stdout of a whole process, imports and model loading included; PeerTimedOut
    once it has run `timeout` seconds (it is killed then)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "ESM_NUM_THREADS": str(threads)}  # esm.cpp's thread pool
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        raise PeerTimedOut(f"still running after {timeout:g} s (--peer-timeout): stopped") from expired
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"benchmark: {' '.join(command[:5])} ... failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def run_worker(tool: str, args: argparse.Namespace, fasta: Path, workdir: Path, options: list[str]) -> dict:
    """fair-esm's or a peer's run, whose process prints its figures as its last line."""
    out = Path(tempfile.mkdtemp(dir=workdir))
    script = [__file__] if tool == FAIR_ESM else [benchmark_peers.__file__, tool]
    command = [sys.executable, *script, "--fasta", str(fasta), "--out-dir", str(out), "--device", args.device,
               *options]
    seconds, stdout = whole_process(command, args.threads, None if tool == FAIR_ESM else args.peer_timeout)
    return {"process_seconds": seconds, "out": out, **json.loads(stdout.strip().splitlines()[-1])}


def run_ours(args: argparse.Namespace, model_path: Path, fasta: Path, workdir: Path) -> dict:
    report_path, out = workdir / "report.json", workdir / "ours.h5"
    out.unlink(missing_ok=True)  # computed anew every round (the same command would find it complete)
    command = [sys.executable, str(REPO / "extract" / "esm_features.py"), "--model", str(model_path),
               "--fasta", str(fasta), "--out", str(out), "--no-dedupe",
               "--device", args.device, "--dtype", args.dtype, "--toks-per-batch", str(args.toks_per_batch),
               "--report", str(report_path)]
    seconds, _ = whole_process(command, args.threads)
    report = json.loads(report_path.read_text())
    total = report["total"]
    return {"process_seconds": seconds, "out": out, "residues": total["residues_embedded"],
            "tokens": total["tokens"],
            "seconds": report["ranks"][0]["seconds"],  # its batches, as fair-esm's: not the loading
            "peak_host_bytes": total["peak_host_bytes"],
            "peak_device_bytes": total["peak_device_bytes"]}


def mean_embeddings(tool: str, run: dict, ids: list[str], layer: int) -> np.ndarray:
    """A run's mean embeddings of the last layer, in input order."""
    if tool == FAIR_ESM:
        return np.stack([torch.load(run["out"] / f"{protein}.pt")["mean_representations"][layer].float().numpy()
                         for protein in ids])
    if tool == OURS:
        with Embeddings(run["out"]) as embeddings:
            return embeddings.by_id(ids, layer)
    return np.load(run["out"] / "means.npy")


def agreement(means: np.ndarray, reference: np.ndarray) -> dict:
    """How far `means` are from fair-esm's, protein by protein."""
    cosine = (means * reference).sum(1) / (np.linalg.norm(means, axis=1) * np.linalg.norm(reference, axis=1))
    return {"proteins": len(means), "max_abs_diff": float(np.abs(means - reference).max()),
            "min_cosine": float(cosine.min())}


def model_flops(layers: int, dim: int, tokens_per_sequence: np.ndarray) -> float:
    """Forward FLOPs of the real tokens (padding is not useful work): per layer and token, 2 per weight of
    the matmuls (4 D^2 attention, 8 D^2 MLP), plus the attention scores and their use of the values
    (4 D per key of the token's own sequence)."""
    tokens = tokens_per_sequence.astype(np.float64)
    return layers * (24 * dim * dim * tokens.sum() + 4 * dim * (tokens**2).sum())


def measured_bf16_peak(device: str, trials: int = 5, trial_seconds: float = 0.5) -> float:
    """The device's bf16 matrix throughput in FLOP/s: the best of several timed runs of large square
    matmuls, after a second of warm-up so that the clocks have ramped up."""
    size = 8192
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)

    def timed(repeats: int) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        torch.cuda.synchronize()
        return time.perf_counter() - started

    repeats = 1
    while timed(repeats) < 1.0:  # warm-up, and the repeats that one timed run of about a second takes
        repeats *= 2
    repeats = max(1, int(repeats * trial_seconds))
    return 2 * size**3 * repeats / min(timed(repeats) for _ in range(trials))


def tool_name(tool: str, args: argparse.Namespace, dtype: str) -> str:
    if tool == FAIR_ESM:
        return "fair-esm extract" + (" (bf16 autocast)" if args.fair_esm_autocast else " (fp32)")
    if tool == OURS:
        return f"esm-features ({dtype})"
    if tool == "transformers":
        return f"transformers {importlib.metadata.version('transformers')} EsmModel, SDPA ({dtype})"
    version = importlib.metadata.version("esm-cpp")
    return f"esm.cpp {version} (int8, quantize_weights)" if tool == "esm-cpp-int8" else f"esm.cpp {version} (fp32)"


def _row(name: str, runs: list[dict], shape: dict, peak: float | None) -> dict:
    process = statistics.median(r["process_seconds"] for r in runs)
    compute = statistics.median(r["seconds"] for r in runs)
    first = runs[0]
    row = {"tool": name, "process_s": round(process, 2), "compute_s": round(compute, 2),
           "residues_per_s": round(first["residues"] / process, 1),
           "tokens_per_s": round(first["tokens"] / compute, 1),
           "padding_share": round(1 - first["residues"] / first["tokens"], 3),
           "peak_host_GiB": round(max(r["peak_host_bytes"] for r in runs) / 2**30, 2)}
    if first["peak_device_bytes"] is not None:
        row["peak_device_GiB"] = round(max(r["peak_device_bytes"] for r in runs) / 2**30, 2)
    if peak:
        row["TFLOP_per_s"] = round(shape["model_flops"] / compute / 1e12, 1)
        row["share_of_bf16_peak"] = round(shape["model_flops"] / compute / peak, 3)
    return row


def machine() -> dict:
    """The CPU (model name, and the flags that decide bf16's speed), torch's version and the date."""
    capabilities, _ = cpu_capabilities()
    try:
        model_name = re.search(r"^model name\s*:\s*(.*)$", CPUINFO.read_text(), re.MULTILINE)
    except OSError:
        model_name = None
    return {"cpu": model_name.group(1) if model_name else "unknown", "cores": os.cpu_count(),
            **{flag: bool((capabilities or {}).get(flag)) for flag in ("avx512_bf16", "amx_tile", "amx_bf16")},
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")}


def benchmark(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="esm_features_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    choice = choose_dtype(args.dtype, torch.device(args.device))
    dtype = dtype_name(choice.dtype)
    model_path, fasta, shape = prepare(args, workdir)
    peers, skipped = runnable_peers(args)
    autocast = ["--fair-esm-autocast"] if args.fair_esm_autocast else []
    options = {FAIR_ESM: ["--fair-esm-worker", str(model_path), "--toks-per-batch", str(args.toks_per_batch),
                          "--threads", str(args.threads), *autocast],
               **peer_inputs(peers, model_path, fasta, args.toks_per_batch, workdir, dtype)}
    peak = measured_bf16_peak(args.device) if args.device == "cuda" else None
    tools = [FAIR_ESM, OURS, *peers]
    runs, stopped = {tool: [] for tool in tools}, {}
    for _ in range(args.rounds):
        for tool in tools:
            try:
                runs[tool].append(run_ours(args, model_path, fasta, workdir) if tool == OURS else
                                  run_worker(tool, args, fasta, workdir, options[tool]))
            except PeerTimedOut as timed_out:
                stopped[tool] = str(timed_out)
        tools = [tool for tool in tools if tool not in stopped]
    ids = read_inputs([fasta], ESM2_ALPHABET).ids
    reference = mean_embeddings(FAIR_ESM, runs[FAIR_ESM][-1], ids, shape["layers"])
    rows = {tool: _row(tool_name(tool, args, dtype), runs[tool], shape, peak) for tool in tools}
    for tool, row in rows.items():
        row["x_fair_esm"] = round(rows[FAIR_ESM]["process_s"] / row["process_s"], 2)
        row["x_fair_esm_compute"] = round(rows[FAIR_ESM]["compute_s"] / row["compute_s"], 2)
        row["ours_x"] = round(row["process_s"] / rows[OURS]["process_s"], 2)
        if tool != FAIR_ESM:
            row["agreement_with_fair_esm"] = agreement(mean_embeddings(tool, runs[tool][-1], ids, shape["layers"]),
                                                       reference)
    print(json.dumps({"model": shape, "device": args.device, "threads": args.threads, "rounds": args.rounds,
                      "toks_per_batch": args.toks_per_batch, "dtype": dtype, "dtype_reason": choice.reason,
                      "machine": machine(), "bf16_peak_TFLOP_per_s": round(peak / 1e12, 1) if peak else None}))
    for line in [*skipped, *({"tool": tool, "stopped": why} for tool, why in stopped.items()), *rows.values()]:
        print(json.dumps(line))
    return list(rows.values())


def main(argv: list[str] | None = None) -> int:
    args = create_parser().parse_args(argv)
    if args.fair_esm_worker:
        torch.set_num_threads(args.threads)
        print(json.dumps(fair_esm_extract(args)))
        return 0
    if args.model is None:
        create_parser().error("--model is required")
    try:
        benchmark(args)
    except UserError as err:  # an unusable --model or --fasta: one line, as the job says it
        sys.stderr.write(f"benchmark: {err.prefix}{err}\n")
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
