"""The one contract between a model and the rest of the suite: what the engine and the command call on it.

A model is any object with the members of `Embedder`; `extract/models/esm2/` is one. The engine builds it
through a `ModelFactory`, which the command supplies, once the rank knows its device and process group.
The engine, the data, output and runtime folders know a model only through this contract, so a model over
another alphabet (DNA, say) runs through the same machinery. Arrays of counts are per row, in the order of
the `lengths` given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Protocol, TypeVar

import numpy as np
import torch

from extract.output.hdf5_file import RowDataset

T = TypeVar("T")


@dataclass(frozen=True)
class Loading:
    """What the engine tells a model factory: where the rank computes, and how its ranks share the loading."""

    device: torch.device  # where the rank computes; the compute dtype follows from it
    weights_device: torch.device  # where the weights go: `device`, or meta in a dry run (shapes only, no weights)
    local_leader_first: Callable[[], ContextManager]  # one rank per node goes first (e.g. to fetch weights)
    leader_decides: Callable[[Callable[[], T]], T]  # rank 0's result of a call (or its UserError), on every rank


class Embedder(Protocol):
    device: torch.device  # where the forward runs (meta in a dry run: shapes only, no weights)
    # The residue letters a sequence may hold, upper case; the reader refuses records with any other.
    alphabet: frozenset[str]
    alphabet_name: str  # how messages name the alphabet, e.g. "the ESM-2 protein alphabet"

    def datasets(self) -> list[RowDataset]:
        """The datasets a row fills, with their widths; their names are the file's."""

    def settings(self) -> dict:
        """Everything that decides the file's contents (model, weights' digest, layers, dtype, ...): stored
        as the file's root attributes and fingerprinted, so a resume with other settings is refused."""

    def describe(self) -> str:
        """One line for the log: the model and how it runs (device, compute dtype and why)."""

    def run_context(self) -> dict:
        """What the run report records of how this run computes that is not the file's contents (not
        fingerprinted: a resume on other hardware may differ here), e.g. why its compute dtype."""

    def auto_token_budget(self) -> int:
        """The token budget `--toks-per-batch auto` means for this model on its device."""

    def tokens_per_input(self, lengths: np.ndarray) -> np.ndarray:
        """The tokens of each of a row's model inputs (a row may be cut into several windows, all this long)."""

    def inputs_per_row(self, lengths: np.ndarray) -> np.ndarray:
        """How many model inputs a row of this many residues becomes."""

    def residues_covered(self, lengths: np.ndarray) -> np.ndarray:
        """How many of a row's residues its outputs cover (a truncated row: those of its first window)."""

    def computed_tokens(self, tokens_per_input: np.ndarray, inputs_per_row: np.ndarray) -> int:
        """The tokens the forward computes for a batch of these rows (packed: the real ones; padded: the
        longest input's times the inputs), as the run report counts them."""

    def prepare(self, sequences: list[str]) -> Any:
        """A batch's model inputs, made on the host (on a thread ahead of the forward)."""

    def embed(self, inputs: Any) -> dict[str, np.ndarray]:
        """The batch's values per dataset name, rows in batch order (per-token datasets: every row's
        `residues_covered` rows, concatenated); may raise torch.OutOfMemoryError."""

    def embed_low_memory(self, sequence: str) -> dict[str, np.ndarray]:
        """The same values for one row with less peak memory: the last retry after running out of memory."""


ModelFactory = Callable[[Loading], Embedder]  # the model as the command line asks for it; UserError if it cannot be
