"""A model that is not ESM-2, for showing that the engine runs any model of the contract (extract/contract.py).

It reads DNA (ACGTN) and "embeds" each residue as its letter, one-hot, followed by its position (1, 2, ...):
`per_tok/layer_0` holds those rows, `mean/layer_0` their mean, and `bos/layer_0` each letter's count and the
residues counted. A sequence longer than `max_residues` is truncated to its first `max_residues`. Each
model input is its residues plus one start token, and a batch pads every input to its longest, so its
token cost and its token count are not ESM-2's. The math is simple enough for a test to compute
the expected file from the sequences alone (`expected_rows`).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from extract.contract import ModelFactory
from extract.output.hdf5_file import RowDataset

LETTERS = "ACGTN"
WIDTH = len(LETTERS) + 1  # one-hot letter, then position
OUTPUTS = ("mean", "bos", "per_tok")
AUTO_TOKEN_BUDGET = 200
LETTER_NUMBER = np.zeros(256, np.int64)  # a letter's byte -> its place in LETTERS
LETTER_NUMBER[np.frombuffer(LETTERS.encode(), np.uint8)] = np.arange(len(LETTERS))


class ToyEmbedder:
    alphabet = frozenset(LETTERS)
    alphabet_name = "the DNA alphabet ACGTN"

    def __init__(self, device: torch.device, outputs: tuple[str, ...] = ("mean",), max_residues: int = 48,
                 seconds_per_batch: float = 0.0):
        self.device = device
        self.outputs = outputs
        self.max_residues = max_residues
        self.seconds_per_batch = seconds_per_batch  # a slow model, for tests that stop a job half-way

    @classmethod
    def factory(cls, outputs: tuple[str, ...], max_residues: int, seconds_per_batch: float) -> ModelFactory:
        return lambda loading: cls(loading.weights_device, outputs, max_residues, seconds_per_batch)

    def datasets(self) -> list[RowDataset]:
        return [RowDataset(f"{output}/layer_0", WIDTH, per_token=output == "per_tok") for output in self.outputs]

    def settings(self) -> dict:
        return {"model": "toy composition", "alphabet": LETTERS, "max_residues": self.max_residues,
                "include": list(self.outputs)}

    def describe(self) -> str:
        return f"toy composition model on {self.device}"

    def run_context(self) -> dict:
        return {}

    def auto_token_budget(self) -> int:
        return AUTO_TOKEN_BUDGET

    def tokens_per_input(self, lengths: np.ndarray) -> np.ndarray:
        return self.residues_covered(lengths) + 1

    def inputs_per_row(self, lengths: np.ndarray) -> np.ndarray:
        return np.ones_like(lengths)

    def residues_covered(self, lengths: np.ndarray) -> np.ndarray:
        return np.minimum(lengths, self.max_residues)

    def computed_tokens(self, tokens_per_input: np.ndarray, inputs_per_row: np.ndarray) -> int:
        return int(tokens_per_input.max()) * int(inputs_per_row.sum())

    def prepare(self, sequences: list[str]) -> list[np.ndarray]:
        """Each sequence's letters as bytes, truncated."""
        return [np.frombuffer(seq[: self.max_residues].encode(), np.uint8) for seq in sequences]

    def embed(self, inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(self.seconds_per_batch)
        per_row = [_residue_rows(codes) for codes in inputs]
        values = {"mean/layer_0": np.stack([rows.mean(0) for rows in per_row]),
                  "bos/layer_0": np.stack([np.append(rows[:, :-1].sum(0), len(rows)) for rows in per_row]),
                  "per_tok/layer_0": np.concatenate(per_row)}
        return {f"{output}/layer_0": values[f"{output}/layer_0"].astype(np.float32) for output in self.outputs}

    def embed_low_memory(self, sequence: str) -> dict[str, np.ndarray]:
        return self.embed(self.prepare([sequence]))


def _residue_rows(codes: np.ndarray) -> np.ndarray:
    letters = LETTER_NUMBER[codes]
    rows = np.zeros((len(codes), WIDTH), np.float64)
    rows[np.arange(len(codes)), letters] = 1
    rows[:, -1] = np.arange(1, len(codes) + 1)
    return rows


def expected_rows(sequence: str, max_residues: int) -> dict[str, np.ndarray]:
    """The toy's values for one normalised sequence, worked out letter by letter."""
    kept = sequence[:max_residues]
    per_tok = np.array([[float(letter == c) for c in LETTERS] + [position]
                        for position, letter in enumerate(kept, start=1)])
    counts = [kept.count(c) for c in LETTERS]
    return {"per_tok/layer_0": per_tok,
            "mean/layer_0": np.array([count / len(kept) for count in counts] + [(len(kept) + 1) / 2]),
            "bos/layer_0": np.array(counts + [len(kept)], dtype=np.float64)}
