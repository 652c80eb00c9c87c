"""Protein FASTA in, ESM-2 embeddings out, in one HDF5 file.

    torchrun --nproc_per_node=N extract/esm_features.py --model M --fasta F [F ...] --out OUT.h5
    python extract/esm_features.py ...        # the same, one process

In-process, for jobs that already run a process group: `from extract.esm_features import main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):  # started as a script: make the `extract` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract.contract import Loading  # noqa: E402
from extract.engine.entry import JobRequest, exit_code, run_rank  # noqa: E402
from extract.models.esm2.checkpoints import checkpoint_sha256, load_model  # noqa: E402
from extract.models.esm2.embedder import Esm2Embedder  # noqa: E402
from extract.models.long_sequences import MODES, LongSequencePolicy  # noqa: E402
from extract.models.pooling import OUTPUTS  # noqa: E402
from extract.output.hdf5_file import STORAGE_DTYPES  # noqa: E402
from extract.runtime import collectives  # noqa: E402
from extract.runtime.device import DTYPES, agreed_dtype, choose_dtype  # noqa: E402

REPORTED_PACKAGES = ("torch", "fair-esm", "h5py", "numpy", "biopython", "safetensors")


# fair-esm extract's spellings of our options, accepted as the same options
FAIR_ESM_SPELLINGS = {"--repr_layers": "--repr-layers", "--toks_per_batch": "--toks-per-batch",
                      "--truncation_seq_length": "--truncation-seq-length", "--nogpu": "--device cpu"}


class _Parser(argparse.ArgumentParser):
    """Our options, fair-esm's spellings of them, and one line for fair-esm's positional form."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        argv = sys.argv[1:] if args is None else list(args)
        if _in_fair_esms_positional_form(argv):
            self._refuse(f"this is fair-esm's form MODEL FASTA OUTPUT_DIR; esm-features writes one HDF5 file: "
                         f"{_equivalent_command(argv)}")
        parsed = super().parse_args(argv, namespace)
        if parsed.nogpu and parsed.device == "cuda":
            self._refuse("--nogpu and --device cuda contradict each other; give one of them")
        if parsed.nogpu:
            parsed.device = "cpu"
        del parsed.nogpu
        return parsed

    def _refuse(self, problem: str) -> None:
        self.exit(2, f"{self.prog}: error: {problem}\n")


def _in_fair_esms_positional_form(argv: list[str]) -> bool:
    return len(argv) >= 3 and not any(arg.startswith("-") for arg in argv[:3])


def _equivalent_command(argv: list[str]) -> str:
    """Our command for fair-esm's `MODEL FASTA OUTPUT_DIR [options]`, then the export to its .pt files."""
    model, fasta, output_dir = argv[:3]
    out = f"{output_dir.rstrip('/') or output_dir}.h5"
    options = [word for arg in argv[3:] for word in FAIR_ESM_SPELLINGS.get(arg, arg).split()]
    ours = shlex.join(["esm-features", "--model", model, "--fasta", fasta, "--out", out, *options])
    export = shlex.join(["esm-features-export", out, "--fair-esm-dir", output_dir])
    return f"{ours} (then, for fair-esm's .pt files: {export})"


def create_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="esm_features", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="fair-esm name (e.g. esm2_t33_650M_UR50D), path to a fair-esm .pt, Hugging Face model "
                             "directory or cached hub repo id (facebook/esm2_t33_650M_UR50D[@revision]), "
                             "or random:<name>")
    parser.add_argument("--fasta", required=True, nargs="+", type=Path, help="protein FASTA files, plain or gzip")
    parser.add_argument("--out", required=True, type=Path, help="the HDF5 output file")
    # Given twice, these add up (`--include mean --include bos` stores both); their defaults are set after parsing,
    # because argparse would add to them.
    parser.add_argument("--repr-layers", "--repr_layers", type=int, nargs="+", action="extend",
                        help="layers to keep; negative counts from the end, 0 is the embeddings (default: -1)")
    parser.add_argument("--include", nargs="+", choices=OUTPUTS, action="extend",
                        help="representations to store: mean over residues, the BOS token, every residue "
                             "(default: mean)")
    parser.add_argument("--toks-per-batch", "--toks_per_batch", default="auto", type=_token_budget,
                        help="padded tokens per batch, or auto (default)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="compute precision; auto is bf16 on GPUs of compute capability >= 8.0 and on CPUs with "
                             "AMX, else fp32")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--nogpu", action="store_true", help="the same as --device cpu (fair-esm's spelling)")
    parser.add_argument("--attention", choices=["fast", "reference"], default="fast",
                        help="fast: our exact SDPA forward (default); reference: fair-esm's own forward, for checking")
    parser.add_argument("--truncation-seq-length", "--truncation_seq_length", type=int, default=1022,
                        help="residues per model input, as in fair-esm's extract (default: 1022)")
    parser.add_argument("--long-sequences", choices=MODES, default="truncate",
                        help="longer proteins: keep their first --truncation-seq-length residues (truncate, "
                             "default), or cover them with overlapping windows of that length (window)")
    parser.add_argument("--window-overlap", type=int, default=None,
                        help="residues neighbouring windows share (default: a quarter of the window)")
    parser.add_argument("--storage-dtype", choices=STORAGE_DTYPES, default="float32",
                        help="dtype of the stored representations; float16 halves the file (default: float32)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output made from other inputs or settings (one of this very job "
                             "is resumed)")
    parser.add_argument("--progress-seconds", type=_positive_seconds, default=30.0,
                        help="seconds between progress lines of rank 0 (default: 30)")
    parser.add_argument("--report", type=Path, help="write a JSON run report here (also stored in the output)")
    parser.add_argument("--no-dedupe", dest="dedupe", action="store_false",
                        help="compute every row, even where an earlier row holds the same sequence "
                             "(by default identical sequences are computed once and copied)")
    parser.add_argument("--dry-run", nargs="?", const=0, type=_positive_int, metavar="RANKS",
                        help="read, validate and plan, then print what the job would do on RANKS ranks "
                             "(default: this launch's), without loading the model or writing anything")
    return parser


def _token_budget(text: str) -> str | int:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number or auto")
    return int(text)


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return seconds


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _build_model(args: argparse.Namespace, long_sequences: LongSequencePolicy, loading: Loading) -> Esm2Embedder:
    """ESM-2 as this job asks for it, its weights where `loading` says (meta in a dry run: none)."""
    dtype = agreed_dtype(collectives.gather(choose_dtype(args.dtype, loading.device)))
    loaded = load_model(args.model, loading.local_leader_first, loading.weights_device, dtype.dtype)
    # The fingerprint tells apart checkpoints of one name by their contents: rank 0 hashes the files.
    loaded = dataclasses.replace(loaded, sha256=loading.leader_decides(lambda: checkpoint_sha256(loaded)))
    return Esm2Embedder(loaded, loading.weights_device, dtype.dtype, args.repr_layers, long_sequences, args.include,
                        args.attention, dtype_reason=dtype.reason)


def run(args: argparse.Namespace, argv: list[str]) -> None:
    """The whole job for this rank (extract/engine/entry.py) with the model this command line asks for;
    raises UserError or JobError when it cannot finish, StopRequested when a signal stopped it."""
    long_sequences = LongSequencePolicy.from_options(args.long_sequences, args.truncation_seq_length,
                                                     args.window_overlap)
    request = JobRequest(fasta=args.fasta, out=args.out, device=args.device, toks_per_batch=args.toks_per_batch,
                         overwrite=args.overwrite, progress_seconds=args.progress_seconds,
                         storage_dtype=args.storage_dtype, report=args.report, dedupe=args.dedupe,
                         dry_run_ranks=args.dry_run, argv=argv, reported_packages=REPORTED_PACKAGES)
    run_rank(request, lambda loading: _build_model(args, long_sequences, loading))


def main(argv: list[str] | None = None) -> int:
    """Run the job; returns the exit code: 0 complete, 2 bad usage or input, 128 + the signal's number
    when a signal stopped it (rerunning resumes), 1 otherwise.

    Inside a job that already runs a process group, this uses that group and leaves it initialised;
    it may be called any number of times."""
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    try:
        args = create_parser().parse_args(argv)
    except SystemExit as exit_request:  # argparse printed the usage or --help; return its code
        return int(exit_request.code or 0)
    args.repr_layers, args.include = args.repr_layers or [-1], args.include or ["mean"]
    return exit_code("esm_features", lambda: run(args, argv))


if __name__ == "__main__":
    sys.exit(main())
