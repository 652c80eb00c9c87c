"""ESM-2 as the engine's pluggable model: tokenise a batch, run the forward pass, pool on the device."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from esm.data import BatchConverter

from extract import pooling
from extract.errors import UserError
from extract.esm2_chunked_attention import chunked_forward
from extract.esm2_forward import embed_batch, esm2_representations
from extract.long_sequences import LongSequencePolicy
from extract.model_loading import LoadedModel
from extract.output_file import RowDataset

CPU_TOKEN_BUDGET = 4096
MAX_TOKEN_BUDGET = 1 << 20
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def choose_dtype(requested: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on GPUs of compute capability 8.0 or newer, fp32 everywhere else."""
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


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


class Esm2Embedder:
    """Mean, BOS and per-residue representations of the chosen layers (BOS, EOS and padding are not
    residues); proteins longer than the truncation length are truncated or windowed as `long_sequences` says."""

    def __init__(self, loaded: LoadedModel, device: torch.device, dtype: torch.dtype,
                 repr_layers: Sequence[int], long_sequences: LongSequencePolicy, outputs: Sequence[str] = ("mean",),
                 attention: str = "fast"):
        self.loaded = loaded
        self.attention = attention
        self.device = device
        self.dtype = dtype
        self.layers = resolve_layers(repr_layers, loaded.num_layers)
        self.long_sequences = long_sequences
        self.truncation_seq_length = long_sequences.window
        self.outputs = [name for name in pooling.OUTPUTS if name in outputs]
        self.model = loaded.model.eval().to(device=device, dtype=dtype)
        self._converter = BatchConverter(loaded.alphabet, self.truncation_seq_length)

    def datasets(self) -> list[RowDataset]:
        return [RowDataset(pooling.dataset_name(output, layer), self.loaded.embed_dim, per_token=output == "per_tok")
                for output in self.outputs for layer in self.layers]

    def tokens_per_row(self, lengths: np.ndarray) -> np.ndarray:
        """Tokens of each model input of a row (its windows are all this long): residues plus BOS and EOS."""
        return np.minimum(lengths, self.truncation_seq_length) + 2

    def inputs_per_row(self, lengths: np.ndarray) -> np.ndarray:
        return self.long_sequences.windows_per_protein(lengths)

    def residues_embedded(self, lengths: np.ndarray) -> np.ndarray:
        return self.long_sequences.residues_embedded(lengths)

    def settings(self) -> dict:
        return {
            "model": self.loaded.name,
            "random_weights": self.loaded.random_weights,
            "num_layers": self.loaded.num_layers,
            "embed_dim": self.loaded.embed_dim,
            "repr_layers": self.layers,
            "include": self.outputs,
            "truncation_seq_length": self.truncation_seq_length,
            **self.long_sequences.settings(),
            "compute_dtype": dtype_name(self.dtype),
        }

    @torch.inference_mode()
    def embed(self, sequences: list[str]) -> dict[str, np.ndarray]:
        layout = self.long_sequences.layout(np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences)))
        tokens = self._tokens(layout.window_sequences(sequences))
        return pooling.pool(self._representations(tokens), layout, self.outputs)

    def _representations(self, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
        """Padded (windows, tokens, width) per layer, from our fast forward or fair-esm's own."""
        if self.attention == "reference":
            return self.model(tokens, repr_layers=self.layers)["representations"]
        if tokens.device.type != "cpu":  # padded already: no round trip through packed rows
            return esm2_representations(self.model, tokens, self.layers)
        rows, _ = embed_batch(self.model, tokens, self.layers, packed=True)
        real = tokens.ne(self.model.padding_idx)
        padded = {}
        for layer, values in rows.items():
            padded[layer] = values.new_zeros(*tokens.shape, values.shape[-1])
            padded[layer][real] = values
        return padded

    @torch.inference_mode()
    def embed_low_memory(self, sequence: str) -> dict[str, np.ndarray]:
        """The same result for one protein, its windows one at a time and each window's attention computed
        in chunks: for when `embed` runs out of device memory even on that protein alone."""
        layout = self.long_sequences.layout(np.array([len(sequence)]))
        windows = [chunked_forward(self.model, self._tokens([window]), self.layers)
                   for window in layout.window_sequences([sequence])]
        # A protein's windows are all equally long, so they stack as one padding-free batch would.
        representations = {layer: torch.cat([window[layer] for window in windows]) for layer in self.layers}
        return pooling.pool(representations, layout, self.outputs)

    def _tokens(self, windows: list[str]) -> torch.Tensor:
        _, _, tokens = self._converter([("", window) for window in windows])
        return tokens.to(self.device, non_blocking=True)

    def auto_token_budget(self) -> int:
        """Padded tokens per batch: fair-esm's 4096 on the CPU; on a GPU at least the seed plan's
        2048 (fp32) / 3072 (16-bit), more where half the free memory holds it."""
        if self.device.type != "cuda":
            return CPU_TOKEN_BUDGET
        floor = 2048 if self.dtype == torch.float32 else 3072
        free_bytes, _ = torch.cuda.mem_get_info(self.device)
        element = torch.finfo(self.dtype).bits // 8
        model = self.model
        # One layer's activations per token, plus an fp32 row of full-length attention scores per head.
        per_token = element * model.embed_dim * 12 + 4 * model.attention_heads * (self.truncation_seq_length + 2)
        return int(max(floor, min(MAX_TOKEN_BUDGET, free_bytes // 2 // per_token)))
