"""Synthetic proteins: random sequences with real proteins' amino-acid shares and length spread, as FASTA.

    python launch/make_proteins.py --records 30 --out proteins.fasta [--seed 0] [--median 300] [--spread 0.6]

Lengths are log-normal: half the proteins are shorter than --median residues, and --spread is the
standard deviation of the lengths' natural log (the defaults put about 2% past ESM-2's 1022-residue
window); none is longer than --max-length. Each sequence starts with M,
then draws residues with UniProtKB/Swiss-Prot's amino-acid composition. Headers are `>ID description`,
sequences wrapped at 60 columns as NCBI writes them. The same arguments give the same file. These stand
in for real proteins where none may ship (the README's example, tests without the phage set): the
values an ESM-2 computes for them mean nothing biologically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

# Per cent of each amino acid in UniProtKB/Swiss-Prot (release statistics, rounded).
COMPOSITION = {"A": 8.25, "R": 5.53, "N": 4.06, "D": 5.45, "C": 1.37, "Q": 3.93, "E": 6.75, "G": 7.07,
               "H": 2.27, "I": 5.96, "L": 9.66, "K": 5.84, "M": 2.42, "F": 3.86, "P": 4.70, "S": 6.56,
               "T": 5.34, "W": 1.08, "Y": 2.92, "V": 6.87}
MIN_LENGTH = 20
LINE_WIDTH = 60


def synthetic_proteins(count: int, seed: int = 0, median: float = 300, spread: float = 0.6,
                       max_length: int = 2500, prefix: str = "synthetic_") -> list[tuple[str, str, str]]:
    """`count` proteins as (id, description, sequence)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.rint(rng.lognormal(np.log(median), spread, size=count)), MIN_LENGTH, max_length)
    letters = np.frombuffer("".join(COMPOSITION).encode(), np.uint8)
    shares = np.array(list(COMPOSITION.values())) / sum(COMPOSITION.values())
    records = []
    for number, length in enumerate(lengths.astype(int), 1):
        residues = b"M" + rng.choice(letters, size=length - 1, p=shares).tobytes()
        records.append((f"{prefix}{number:06d}.1", f"synthetic protein {number} [launch/make_proteins.py seed {seed}]",
                        residues.decode()))
    return records


def write_fasta(path: Path, records: list[tuple[str, str, str]]) -> Path:
    with open(path, "w") as out:
        for protein, description, sequence in records:
            lines = "\n".join(sequence[i : i + LINE_WIDTH] for i in range(0, len(sequence), LINE_WIDTH))
            out.write(f">{protein} {description}\n{lines}\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, required=True, help="proteins to write")
    parser.add_argument("--out", type=Path, required=True, help="FASTA to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--median", type=float, default=300, help="median length in residues (default: 300)")
    parser.add_argument("--spread", type=float, default=0.6,
                        help="standard deviation of the natural log of the lengths (default: 0.6)")
    parser.add_argument("--max-length", type=int, default=2500, help="longest protein (default: 2500)")
    parser.add_argument("--prefix", default="synthetic_", help="ids are PREFIX000001.1, ... (default: synthetic_)")
    args = parser.parse_args(argv)
    if args.records < 1 or args.median < MIN_LENGTH or args.spread < 0 or args.max_length < args.median:
        parser.error(f"need --records >= 1, --median >= {MIN_LENGTH}, --spread >= 0 and --max-length >= --median")
    records = synthetic_proteins(args.records, args.seed, args.median, args.spread, args.max_length, args.prefix)
    write_fasta(args.out, records)
    lengths = sorted(len(sequence) for _, _, sequence in records)
    print(f"{args.out}: {len(records)} proteins of {lengths[0]} to {lengths[-1]} residues "
          f"(median {lengths[len(lengths) // 2]}), {sum(n > 1022 for n in lengths)} longer than 1022", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
