"""ESM-2's model inputs, built packed on the host: each window's tokens (BOS, residues, EOS) in turn.

The tokens are fair-esm's own: its alphabet's `encode`, truncated to the window and framed by BOS and
EOS as its `BatchConverter` frames them, without the padding. The padded form is built only for what
needs it (padded attention, fair-esm's own forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from esm.data import Alphabet


@dataclass(frozen=True)
class PackedTokens:
    """Window i's tokens are `tokens[offsets[i]:offsets[i + 1]]`; both on the host."""

    tokens: torch.Tensor  # (total tokens,) int64
    offsets: torch.Tensor  # (windows + 1,) int64

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets.diff()

    def padded(self, padding_idx: int) -> torch.Tensor:
        """(windows, longest) with `padding_idx` after each window's tokens, as fair-esm's BatchConverter
        makes the batch."""
        lengths = self.lengths
        real = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
        padded = torch.full(real.shape, padding_idx, dtype=self.tokens.dtype)
        padded[real] = self.tokens
        return padded


def pack(alphabet: Alphabet, windows: list[str], truncation_seq_length: int) -> PackedTokens:
    """The tokens fair-esm's `BatchConverter(alphabet, truncation_seq_length)` gives these windows."""
    bos = [alphabet.cls_idx] if alphabet.prepend_bos else []
    eos = [alphabet.eos_idx] if alphabet.append_eos else []
    encoded = [bos + alphabet.encode(window)[:truncation_seq_length] + eos for window in windows]
    lengths = torch.tensor([len(window) for window in encoded], dtype=torch.int64)
    return PackedTokens(torch.tensor([token for window in encoded for token in window], dtype=torch.int64),
                        cumulative_offsets(lengths))


def cumulative_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """(n + 1,) offsets of n consecutive runs of rows of these lengths."""
    return F.pad(lengths.cumsum(0), (1, 0))
