"""What fair-esm's own extract computes, for comparing our output against."""

from __future__ import annotations

import numpy as np
import torch
from esm.data import BatchConverter


def fair_esm_tokens(
    model, alphabet, sequences: list[str], layers: list[int], truncation_seq_length: int = 1022
) -> list[dict[int, np.ndarray]]:
    """Per sequence, per absolute layer: the (1 + T, D) representations of BOS and the T residues that
    fair-esm's forward gives.

    One sequence at a time, exactly as fair-esm's extract tokenises and truncates it.
    """
    converter = BatchConverter(alphabet, truncation_seq_length)
    model.eval()
    out = []
    with torch.no_grad():
        for seq in sequences:
            _, _, tokens = converter([("row", seq)])
            reps = model(tokens, repr_layers=layers)["representations"]
            length = min(truncation_seq_length, len(seq))
            out.append({layer: reps[layer][0, : length + 1].float().numpy() for layer in layers})
    return out


def fair_esm_representations(model, alphabet, sequences, layers, truncation_seq_length=1022):
    """Per sequence, per absolute layer: the (T, D) residue representations (BOS and EOS left out)."""
    reps = fair_esm_tokens(model, alphabet, sequences, layers, truncation_seq_length)
    return [{layer: r[layer][1:] for layer in layers} for r in reps]


def fair_esm_means(model, alphabet, sequences, layers, truncation_seq_length=1022):
    reps = fair_esm_representations(model, alphabet, sequences, layers, truncation_seq_length)
    return {layer: np.stack([r[layer].mean(0) for r in reps]) for layer in layers}


def load_fair_esm(path):
    """The checkpoint through fair-esm's own loader (the contact-regression file is not needed)."""
    import warnings

    import esm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = torch.load(path, map_location="cpu", weights_only=False)
        return esm.pretrained.load_model_and_alphabet_core("esm2_test", data)
