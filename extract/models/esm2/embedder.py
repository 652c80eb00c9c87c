"""ESM-2 as the engine's pluggable model: tokenise a batch, run the forward pass, pool on the device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from esm.constants import proteinseq_toks

from extract.models import pooling
from extract.errors import UserError
from extract.models.esm2.forward import CHUNKED, embed_batch
from extract.models.esm2.tokens import PackedTokens, cumulative_offsets, pack
from extract.models.long_sequences import BatchLayout, LongSequencePolicy
from extract.models.esm2.checkpoints import LoadedModel
from extract.models.esm2.token_budget import CPU_TOKEN_BUDGET, memory_token_budget
from extract.output.hdf5_file import RowDataset
from extract.runtime.device import dtype_name


def resolve_layers(requested: Sequence[int], num_layers: int) -> list[int]:
    """fair-esm's meaning: negative counts from the end, so -1 is the last layer; 0 is the embeddings."""
    layers = []
    for layer in requested:
        if not -(num_layers + 1) <= layer <= num_layers:
            raise UserError(f"--repr-layers {layer}: the model has layers 0 to {num_layers} "
                            f"(or -{num_layers + 1} to -1 counted from the end)")
        absolute = (layer + num_layers + 1) % (num_layers + 1)
        if absolute not in layers:
            layers.append(absolute)
    return layers


@dataclass(frozen=True)
class Esm2Inputs:
    """A batch's model inputs, made on the host: its windows, and their tokens packed."""

    layout: BatchLayout
    tokens: PackedTokens


class Esm2Embedder:
    """Mean, BOS and per-residue representations of the chosen layers (BOS, EOS and padding are not
    residues); proteins longer than the truncation length are truncated or windowed as `long_sequences` says.
    The engine's model (extract/contract.py)."""

    # Residue letters of the ESM-2 alphabet; the gap symbols '-' and '.' mean an alignment, not a protein.
    alphabet = frozenset(tok for tok in proteinseq_toks["toks"] if tok.isalpha())
    alphabet_name = "the ESM-2 protein alphabet"

    def __init__(self, loaded: LoadedModel, device: torch.device, dtype: torch.dtype,
                 repr_layers: Sequence[int], long_sequences: LongSequencePolicy, outputs: Sequence[str] = ("mean",),
                 attention: str = "fast", dtype_reason: str = ""):
        self.loaded = loaded
        self.attention = attention
        self.device = device
        self.dtype = dtype
        self.dtype_reason = dtype_reason  # why this dtype, for the log and the run report
        self.layers = resolve_layers(repr_layers, loaded.num_layers)
        self.long_sequences = long_sequences
        self.truncation_seq_length = long_sequences.window
        self.outputs = [name for name in pooling.OUTPUTS if name in outputs]
        # load_model put the weights there already: then this is a no-op, no copy.
        self.model = loaded.model.eval().to(device=device, dtype=dtype)

    def datasets(self) -> list[RowDataset]:
        return [RowDataset(pooling.dataset_name(output, layer), self.loaded.embed_dim, per_token=output == "per_tok")
                for output in self.outputs for layer in self.layers]

    def tokens_per_input(self, lengths: np.ndarray) -> np.ndarray:
        """Tokens of each model input of a row (its windows are all this long): residues plus BOS and EOS."""
        return np.minimum(lengths, self.truncation_seq_length) + 2

    def inputs_per_row(self, lengths: np.ndarray) -> np.ndarray:
        return self.long_sequences.windows_per_protein(lengths)

    def residues_covered(self, lengths: np.ndarray) -> np.ndarray:
        return self.long_sequences.residues_covered(lengths)

    def settings(self) -> dict:
        return {
            "model": self.loaded.name,
            "model_source": self.loaded.source,
            **({"model_revision": self.loaded.revision} if self.loaded.revision else {}),
            **({"model_sha256": self.loaded.sha256} if self.loaded.sha256 else {}),
            "random_weights": self.loaded.random_weights,
            "num_layers": self.loaded.num_layers,
            "embed_dim": self.loaded.embed_dim,
            "repr_layers": self.layers,
            "include": self.outputs,
            "truncation_seq_length": self.truncation_seq_length,
            **self.long_sequences.settings(),
            "compute_dtype": dtype_name(self.dtype),
        }

    def run_context(self) -> dict:
        return {"compute_dtype_reason": self.dtype_reason}

    def describe(self) -> str:
        weights = " (random weights)" if self.loaded.random_weights else ""
        revision = f"@{self.loaded.revision}" if self.loaded.revision else ""
        heads = f" (heads left out: {', '.join(self.loaded.heads_left_out)})" if self.loaded.heads_left_out else ""
        reason = f" ({self.dtype_reason})" if self.dtype_reason else ""
        return (f"model {self.loaded.name}{revision}{weights}{heads} on {self.device} in {dtype_name(self.dtype)}"
                f"{reason}")

    def prepare(self, sequences: list[str]) -> Esm2Inputs:
        """The host's share of a batch (run ahead of the forward, on another thread): windows and tokens."""
        layout = self.long_sequences.layout(np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences)))
        return Esm2Inputs(layout, self._tokens(layout.window_sequences(sequences)))

    @torch.inference_mode()
    def embed(self, inputs: Esm2Inputs) -> dict[str, np.ndarray]:
        rows = self._rows(inputs.tokens)
        return pooling.pool(rows, inputs.tokens.offsets.numpy(), inputs.layout, self.outputs)

    def _rows(self, batch: PackedTokens) -> dict[int, torch.Tensor]:
        """Every real token's row per layer, windows concatenated as in the batch; from our fast forward
        or fair-esm's own (on the padded batch, then its padding left out)."""
        if self.attention == "fast":
            return embed_batch(self.model, batch, self.layers)
        padded = batch.padded(self.model.padding_idx)
        real = padded.ne(self.model.padding_idx).to(self.device)
        representations = self.model(padded.to(self.device), repr_layers=self.layers)["representations"]
        return {layer: values[real] for layer, values in representations.items()}

    def computed_tokens(self, tokens: np.ndarray, inputs: np.ndarray) -> int:
        """Tokens a batch's forward computes, from its rows' tokens per input and inputs: the real ones
        for our forward (packed), the padded batch for fair-esm's."""
        if self.attention == "fast":
            return int((tokens * inputs).sum())
        return int(tokens.max()) * int(inputs.sum())

    @torch.inference_mode()
    def embed_low_memory(self, sequence: str) -> dict[str, np.ndarray]:
        """The same result for one protein, its windows one at a time and each window's attention computed
        in chunks: for when `embed` runs out of device memory even on that protein alone."""
        layout = self.long_sequences.layout(np.array([len(sequence)]))
        windows = [self._tokens([window]) for window in layout.window_sequences([sequence])]
        rows = [embed_batch(self.model, window, self.layers, CHUNKED) for window in windows]
        lengths = torch.cat([window.lengths for window in windows])
        return pooling.pool({layer: torch.cat([window[layer] for window in rows]) for layer in self.layers},
                            cumulative_offsets(lengths).numpy(), layout, self.outputs)

    def _tokens(self, windows: list[str]) -> PackedTokens:
        return pack(self.loaded.alphabet, windows, self.truncation_seq_length)

    def auto_token_budget(self) -> int:
        """Tokens per batch: fair-esm's 4096 on the CPU; on a GPU what half its free memory holds."""
        if self.device.type != "cuda":
            return CPU_TOKEN_BUDGET
        free_bytes, _ = torch.cuda.mem_get_info(self.device)
        scores = self.truncation_seq_length + 2 if self.attention == "reference" else 0
        return memory_token_budget(free_bytes, self.dtype, self.loaded.embed_dim, len(self.layers),
                                   self.model.attention_heads, scores)


