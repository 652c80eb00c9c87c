"""Load-time benchmark: our loader and fair-esm's against the time to read the checkpoint file.

    python launch/load_benchmark.py --model esm2_t36_3B_UR50D --workdir /var/tmp/loadbench --cold

Writes an ESM-2 of that shape with random weights in fair-esm's published layout (fp32, no
contact-regression weights), then times, each in a fresh process: reading the file, our `load_model`
into fp32 and into bf16 on `--device` (fp32 also with every weight read once afterwards: memory-mapped
weights are only read when first used), and fair-esm's own loader (then `.to(device, bfloat16)` for
bf16). Before each timing the page cache is brought to the same state: warm (the file read once just
before) and, with `--cold`, cold (caches dropped; needs root). The file is deleted at the end unless
`--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # started as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from esm.model.esm2 import ESM2  # noqa: E402
from esm.rotary_embedding import RotaryEmbedding  # noqa: E402

from extract.models.esm2.checkpoints import (  # noqa: E402
    ESM2_ARCHITECTURES, fair_esm_checkpoint, load_model, read_fair_esm_checkpoint)

READ_CHUNK = 64 << 20
CONTACT_REGRESSION = ("contact_head.regression.weight", "contact_head.regression.bias")
KINDS = ["file read", "ours fp32", "ours fp32 + first read of every weight", "ours bf16",
         "fair-esm fp32", "fair-esm bf16"]


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="esm2_t36_3B_UR50D", choices=list(ESM2_ARCHITECTURES))
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where our loader puts the weights")
    parser.add_argument("--cold", action="store_true", help="also time with the page cache dropped (root)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint file")
    parser.add_argument("--measure", nargs=3, metavar=("KIND", "PT", "DEVICE"), help=argparse.SUPPRESS)
    return parser


def write_random_checkpoint(name: str, path: Path) -> int:
    """fp32 random weights of `name`'s shape, one tensor at a time (no second copy of the model in memory);
    the rotary `inv_freq` buffers as fair-esm computes them. Returns the file's size in bytes."""
    layers, embed_dim, heads = ESM2_ARCHITECTURES[name]
    with torch.device("meta"):
        shape_only = ESM2(layers, embed_dim, heads)
    inv_freq = RotaryEmbedding(embed_dim // heads).inv_freq
    state = {}
    for key, meta in shape_only.state_dict().items():
        if key.endswith("inv_freq"):
            state[key] = inv_freq.clone()
        elif key not in CONTACT_REGRESSION:  # published checkpoints ship these in a separate file
            state[key] = torch.empty(meta.shape).normal_(std=0.02)
    state["lm_head.weight"] = state["embed_tokens.weight"]  # tied, stored once, as torch.save of the module
    checkpoint = fair_esm_checkpoint(shape_only)
    checkpoint["model"] = state
    torch.save(checkpoint, path)
    return path.stat().st_size


def measure(kind: str, path: Path, device: torch.device) -> float:
    """Seconds `kind` takes in this (fresh) process, imports excluded."""
    if device.type == "cuda":
        torch.cuda.init()  # the CUDA context is not the loader's time
    started = time.perf_counter()
    if kind == "file read":
        buffer = bytearray(READ_CHUNK)
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    elif kind.startswith("ours"):
        dtype = torch.bfloat16 if "bf16" in kind else torch.float32
        model = load_model(str(path), device=device, dtype=dtype).model
        if "first read" in kind:
            for tensor in model.state_dict().values():
                tensor.max()
        if device.type == "cuda":
            torch.cuda.synchronize()
    else:
        model = fair_esm_load(path).to(device=device, dtype=torch.bfloat16 if kind.endswith("bf16") else None)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - started


def fair_esm_load(path: Path) -> ESM2:
    """fair-esm's loader as its `load_model_and_alphabet_local` runs it, except the file is read by our
    weights-only reader (no code from the file runs), which memory-maps it: read whole, a 3B file and the
    fp32 model it fills would not both fit in this machine's memory."""
    import esm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no contact-regression weights
        data = read_fair_esm_checkpoint(path)
        return esm.pretrained.load_model_and_alphabet_core(path.stem, data)[0]


def prepare_cache(path: Path, cache: str) -> None:
    if cache == "cold":
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    else:
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


def timed_in_fresh_process(kind: str, path: Path, device: str) -> dict:
    command = [sys.executable, __file__, "--measure", kind, str(path), device]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"load_benchmark: {kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def benchmark(args: argparse.Namespace) -> list[dict]:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="esm_features_load_"))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{args.model}.pt"
    started = time.perf_counter()
    size = write_random_checkpoint(args.model, path)
    print(json.dumps({"model": args.model, "device": args.device, "file_GiB": round(size / 2**30, 2),
                      "written_in_s": round(time.perf_counter() - started, 1)}), flush=True)
    rows = []
    try:
        for cache in ["warm", "cold"] if args.cold else ["warm"]:
            for kind in KINDS:
                prepare_cache(path, cache)
                rows.append({"cache": cache, "what": kind, **timed_in_fresh_process(kind, path, args.device)})
                read = next(row["seconds"] for row in rows if row["cache"] == cache and row["what"] == "file read")
                rows[-1]["x_file_read"] = round(rows[-1]["seconds"] / read, 2)
                print(json.dumps(rows[-1]), flush=True)
    finally:
        if not args.keep:
            path.unlink()
    return rows


def peak_resident_bytes() -> int:
    """This process's peak resident memory, the checkpoint's mapped pages included (`ru_maxrss` would not do:
    Linux carries it over from the parent through fork and exec)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def main(argv: list[str] | None = None) -> int:
    args = create_parser().parse_args(argv)
    if args.measure:
        kind, path, device = args.measure
        seconds = measure(kind, Path(path), torch.device(device))
        print(json.dumps({"seconds": round(seconds, 2), "peak_rss_GiB": round(peak_resident_bytes() / 2**30, 2)}))
        return 0
    benchmark(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
