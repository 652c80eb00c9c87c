"""The engine's entry point (extract/engine/entry.py) run with the toy model of tests/toy_model.py, as
extract/esm_features.py runs it with ESM-2: a plain process, or ranks under torchrun.

    python tests/toy_driver.py --fasta F [F ...] --out OUT.h5 [--include mean bos per_tok]
        [--toks-per-batch N|auto] [--max-residues N] [--seconds-per-batch S] [--report R] [--no-dedupe]
    torchrun --standalone --nproc_per_node=2 tests/toy_driver.py ...
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract.engine.entry import JobRequest, exit_code, run_rank  # noqa: E402
from toy_model import OUTPUTS, ToyEmbedder  # noqa: E402


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="toy_driver")
    parser.add_argument("--fasta", required=True, nargs="+", type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--include", nargs="+", choices=OUTPUTS, default=["mean"])
    parser.add_argument("--toks-per-batch", default="auto", type=lambda text: text if text == "auto" else int(text))
    parser.add_argument("--max-residues", type=int, default=48)
    parser.add_argument("--seconds-per-batch", type=float, default=0.0)
    parser.add_argument("--report", type=Path)
    parser.add_argument("--no-dedupe", dest="dedupe", action="store_false")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    request = JobRequest(fasta=args.fasta, out=args.out, device="cpu", toks_per_batch=args.toks_per_batch,
                         overwrite=False, progress_seconds=30.0, storage_dtype="float32", report=args.report,
                         dedupe=args.dedupe, dry_run_ranks=None, argv=argv, reported_packages=("numpy",))
    factory = ToyEmbedder.factory(tuple(args.include), args.max_residues, args.seconds_per_batch)
    return exit_code("toy_driver", lambda: run_rank(request, factory))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
