"""Benchmark: fair-esm's extract workflow against esm-features, side by side, on the same input and weights.

    python launch/benchmark.py --model random:esm2_t12_35M_UR50D --fasta F.fasta --limit 300 --threads 2

Each round runs both as whole processes, alternating (fair-esm first, then ours), so that a shared,
noisy machine slows both alike; the table gives medians and the ratio, and the last line how far our
mean embeddings are from fair-esm's (max abs difference, lowest cosine over the proteins). fair-esm's
side is its extract script's workflow driven through its library API: FastaBatchedDataset,
get_batch_indices, its batch converter, its model's forward, a mean per protein saved with torch.save. `--fair-esm-autocast` runs that
forward under bf16 autocast (the seed plan's approach). On a GPU the table adds tokens/s and the
achieved TFLOP/s against the device's measured bf16 matrix peak.
"""

from __future__ import annotations

import argparse
import json
import os
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
from extract.models.esm2.checkpoints import RANDOM_PREFIX, fair_esm_checkpoint, load_model  # noqa: E402
from extract.models.esm2.embedder import Esm2Embedder  # noqa: E402
from extract.reading import Embeddings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="random:<fair-esm name> or a fair-esm .pt")
    parser.add_argument("--fasta", required=True, type=Path)
    parser.add_argument("--limit", type=int, default=None, help="the first N proteins only")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each process")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="our compute dtype")
    parser.add_argument("--fair-esm-autocast", action="store_true", help="fair-esm under bf16 autocast")
    parser.add_argument("--toks-per-batch", type=int, default=4096, help="both tools' token budget")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--fair-esm-worker", nargs=2, metavar=("MODEL_PT", "FASTA"), help=argparse.SUPPRESS)
    parser.add_argument("--fair-esm-out", type=Path, help=argparse.SUPPRESS)
    return parser


# ---- fair-esm's side: its extract workflow, in a process of its own --------------------------------


def fair_esm_extract(args: argparse.Namespace) -> dict:
    """fair-esm's extract.py loop: batches by its own planner, mean of the last layer per protein."""
    import esm
    from esm.data import FastaBatchedDataset

    model_path, fasta = args.fair_esm_worker
    data = torch.load(model_path, map_location="cpu", weights_only=False)
    model, alphabet = esm.pretrained.load_model_and_alphabet_core("esm2", data)
    model = model.eval().to(args.device)
    dataset = FastaBatchedDataset.from_file(fasta)
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
                           args.fair_esm_out / f"{label.split()[0]}.pt")
    if args.device == "cuda":
        torch.cuda.synchronize()
    return {"residues": residues, "tokens": padded, "seconds": time.perf_counter() - started,
            "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_device_bytes": torch.cuda.max_memory_allocated() if args.device == "cuda" else None}


# ---- the driver -------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace, workdir: Path) -> tuple[Path, Path, dict]:
    """One checkpoint file in fair-esm's layout (kept in `workdir` for the next run: random weights are
    seeded, so it is the same file every time) and one FASTA both tools read."""
    shape_only = load_model(args.model, device=torch.device("meta"))
    model, model_path = shape_only.model, workdir / f"{shape_only.name}.pt"
    if not model_path.exists():
        torch.save(fair_esm_checkpoint(load_model(args.model).model), model_path)
    inputs = read_inputs([args.fasta], Alphabet(Esm2Embedder.alphabet, Esm2Embedder.alphabet_name))
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


def whole_process(command: list[str], threads: int) -> tuple[float, str]:
    """Wall seconds and stdout of a whole process, imports and model loading included."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"benchmark: {' '.join(command[:3])} ... failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def run_fair_esm(args: argparse.Namespace, model_path: Path, fasta: Path, workdir: Path) -> dict:
    out = Path(tempfile.mkdtemp(dir=workdir))
    command = [sys.executable, __file__, "--model", args.model, "--fasta", str(fasta), "--device", args.device,
               "--toks-per-batch", str(args.toks_per_batch), "--fair-esm-worker", str(model_path), str(fasta),
               "--fair-esm-out", str(out)] + (["--fair-esm-autocast"] if args.fair_esm_autocast else [])
    seconds, stdout = whole_process(command, args.threads)
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


def agreement(fair_esm_out: Path, ours: Path, layer: int) -> dict:
    """How far our means are from fair-esm's saved ones, protein by protein."""
    with Embeddings(ours) as embeddings:
        ids, means = embeddings.ids, embeddings.in_input_order(layer)
    theirs = np.stack([torch.load(fair_esm_out / f"{protein}.pt")["mean_representations"][layer].float().numpy()
                       for protein in ids])
    cosine = (means * theirs).sum(1) / (np.linalg.norm(means, axis=1) * np.linalg.norm(theirs, axis=1))
    return {"proteins": len(ids), "max_abs_diff": float(np.abs(means - theirs).max()),
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


def benchmark(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="esm_features_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_path, fasta, shape = prepare(args, workdir)
    peak = measured_bf16_peak(args.device) if args.device == "cuda" else None
    fair, ours = [], []
    for _ in range(args.rounds):
        fair.append(run_fair_esm(args, model_path, fasta, workdir))
        ours.append(run_ours(args, model_path, fasta, workdir))
    fair_name = "fair-esm extract" + (" (bf16 autocast)" if args.fair_esm_autocast else " (fp32)")
    rows = [_row(fair_name, fair, shape, peak), _row(f"esm-features ({args.dtype})", ours, shape, peak)]
    rows[1]["speedup_process"] = round(rows[0]["process_s"] / rows[1]["process_s"], 2)
    rows[1]["speedup_compute"] = round(rows[0]["compute_s"] / rows[1]["compute_s"], 2)
    print(json.dumps({"model": shape, "device": args.device, "threads": args.threads, "rounds": args.rounds,
                      "toks_per_batch": args.toks_per_batch,
                      "bf16_peak_TFLOP_per_s": round(peak / 1e12, 1) if peak else None}))
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"agreement_with_fair_esm": agreement(fair[-1]["out"], ours[-1]["out"], shape["layers"])}))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = create_parser().parse_args(argv)
    if args.fair_esm_worker:
        torch.set_num_threads(args.threads)
        print(json.dumps(fair_esm_extract(args)))
        return 0
    benchmark(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
