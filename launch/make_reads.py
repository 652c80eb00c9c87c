"""A synthetic metagenome sample: six-frame translations of random DNA reads, written as protein FASTA.

    python launch/make_reads.py --records 10000000 --duplicate-share 0.3 --out reads.fasta [--seed 0]

Each read (152 to 510 bases) gives six proteins of 50 to 170 residues, one per reading frame; internal
stop codons become X and a stop codon at the very end is kept as a terminal '*'. A read is, with the
probability given by --duplicate-share, a copy of an earlier read (duplicate reads, abundant genomes),
so that share of the proteins repeats an earlier sequence under a new id. The same seed gives the
same file. An --out ending in .gz is gzip-compressed.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path
from typing import BinaryIO

import numpy as np

MIN_READ, MAX_READ = 152, 510
READS_PER_CHUNK = 20_000
RECENT_READS = 100_000  # duplicates copy one of the most recent distinct reads
FRAMES = ("+1", "+2", "+3", "-1", "-2", "-3")
# The standard genetic code, codons ordered TCAG x TCAG x TCAG; bases are coded T=0, C=1, A=2, G=3.
GENETIC_CODE = np.frombuffer(b"FFLLSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG", np.uint8)
STOP, UNKNOWN = ord("*"), ord("X")


def _translate(bases: np.ndarray, read_lengths: np.ndarray, frame: int) -> list[bytes]:
    """Translate each row's bases from `frame` on, up to its own length."""
    codons = bases[:, frame : frame + 3 * ((bases.shape[1] - frame) // 3)].reshape(len(bases), -1, 3)
    amino = GENETIC_CODE[codons[..., 0] * 16 + codons[..., 1] * 4 + codons[..., 2]]
    protein_lengths = (read_lengths - frame) // 3
    last_is_stop = amino[np.arange(len(amino)), protein_lengths - 1] == STOP
    amino[amino == STOP] = UNKNOWN
    amino[np.arange(len(amino))[last_is_stop], protein_lengths[last_is_stop] - 1] = STOP
    return [row[:n].tobytes() for row, n in zip(amino, protein_lengths)]


def six_frames(rng: np.random.Generator, count: int) -> list[tuple[bytes, ...]]:
    """`count` random reads, each as its six translated frames."""
    read_lengths = rng.integers(MIN_READ, MAX_READ + 1, size=count)
    forward = rng.integers(0, 4, size=(count, MAX_READ), dtype=np.uint8)
    # Reverse complement of each read's own first `length` bases (T<->A, C<->G is 3 - code).
    back = np.clip(read_lengths[:, None] - 1 - np.arange(MAX_READ), 0, None)
    reverse = 3 - np.take_along_axis(forward, back, axis=1)
    frames = [_translate(strand, read_lengths, f) for strand in (forward, reverse) for f in range(3)]
    return list(zip(*frames))


def write_sample(out: BinaryIO, records: int, duplicate_share: float, seed: int) -> int:
    """Write `records` proteins (whole reads, so rounded up to a multiple of six); returns the
    number of proteins that repeat an earlier read's."""
    rng = np.random.default_rng(seed)
    reads = -(-records // len(FRAMES))
    recent: list[tuple[bytes, ...]] = []
    written = repeated = 0
    while written < reads:
        count = min(READS_PER_CHUNK, reads - written)
        is_copy = rng.random(count) < duplicate_share
        is_copy[0] &= bool(recent)
        fresh = iter(six_frames(rng, int((~is_copy).sum())))
        picks = rng.random(count)
        lines = []
        for copy, pick in zip(is_copy, picks):
            if copy:
                frames = recent[int(pick * len(recent))]
                repeated += len(FRAMES)
            else:
                frames = next(fresh)
                recent.append(frames)
            for name, protein in zip(FRAMES, frames):
                lines.append(b">read%d_%s frame %s of a random read\n%s\n" % (written, name.encode(),
                                                                              name.encode(), protein))
            written += 1
        del recent[:-RECENT_READS]
        out.write(b"".join(lines))
    return repeated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, required=True, help="proteins to write (rounded up to whole reads)")
    parser.add_argument("--duplicate-share", type=float, default=0.0,
                        help="share of reads that copy an earlier read (0 to 1; default 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="FASTA to write; .gz for gzip")
    args = parser.parse_args(argv)
    if not 0 <= args.duplicate_share <= 1:
        parser.error("--duplicate-share must be between 0 and 1")
    opener = gzip.open if args.out.suffix == ".gz" else open
    with opener(args.out, "wb") as out:
        repeated = write_sample(out, args.records, args.duplicate_share, args.seed)
    total = -(-args.records // len(FRAMES)) * len(FRAMES)
    print(f"{args.out}: {total} proteins, {repeated} ({repeated / total:.1%}) repeating an earlier one",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
