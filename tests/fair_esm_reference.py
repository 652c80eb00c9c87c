"""What fair-esm's own extract computes, for comparing our output against."""

from __future__ import annotations

import numpy as np
import torch
from esm.data import BatchConverter

from extract.models.long_sequences import LongSequencePolicy


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


def most_central_window(starts: np.ndarray, stops: np.ndarray, length: int) -> np.ndarray:
    """Per residue, by brute force: the window holding it farthest from the window's ends (first on ties)."""
    residue = np.arange(length)[None, :]
    distance_to_end = np.minimum(residue - starts[:, None], stops[:, None] - 1 - residue)
    return np.argmax(np.where(distance_to_end >= 0, distance_to_end, -1), axis=0)


def fair_esm_windowed(model, alphabet, sequence: str, window: int, overlap: int, layers: list[int]) -> dict:
    """Each residue taken from fair-esm's own forward on its most central window; BOS from the first."""
    starts = LongSequencePolicy("window", window, overlap).window_starts(len(sequence))
    stops = np.minimum(starts + window, len(sequence))
    reps = fair_esm_tokens(model, alphabet, [sequence[a:b] for a, b in zip(starts, stops)], layers, window)
    chosen = most_central_window(starts, stops, len(sequence))
    position = 1 + np.arange(len(sequence)) - starts[chosen]
    expected = {}
    for layer in layers:
        per_tok = np.stack([reps[w][layer][p] for w, p in zip(chosen, position)])
        expected.update({f"per_tok/layer_{layer}": per_tok, f"mean/layer_{layer}": per_tok.mean(0),
                         f"bos/layer_{layer}": reps[0][layer][0]})
    return expected


def load_fair_esm(path):
    """The checkpoint through fair-esm's own loader (the contact-regression file is not needed)."""
    import warnings

    import esm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = torch.load(path, map_location="cpu", weights_only=False)
        return esm.pretrained.load_model_and_alphabet_core("esm2_test", data)


def fair_esm_extract(model_path, fasta, output_dir, repr_layers, include, truncation_seq_length=1022,
                     toks_per_batch=4096) -> None:
    """fair-esm's scripts/extract.py (its `run`, on the CPU): FastaBatchedDataset and its batches, the batch
    converter's truncation, the model's forward, and one `torch.save` of its dict per record, named
    `output_dir / f"{label}.pt"` with `label` the whole header line (a `/` in it makes a subdirectory)."""
    from esm.data import FastaBatchedDataset

    model, alphabet = load_fair_esm(model_path)
    model.eval()
    dataset = FastaBatchedDataset.from_file(fasta)
    batches = dataset.get_batch_indices(toks_per_batch, extra_toks_per_seq=1)
    loader = torch.utils.data.DataLoader(dataset, collate_fn=alphabet.get_batch_converter(truncation_seq_length),
                                         batch_sampler=batches)
    output_dir.mkdir(parents=True, exist_ok=True)
    layers = [(i + model.num_layers + 1) % (model.num_layers + 1) for i in repr_layers]
    with torch.no_grad():
        for labels, strs, toks in loader:
            representations = model(toks, repr_layers=layers)["representations"]
            for i, label in enumerate(labels):
                result = {"label": label}
                truncate_len = min(truncation_seq_length, len(strs[i]))
                if "per_tok" in include:
                    result["representations"] = {layer: t[i, 1 : truncate_len + 1].clone()
                                                 for layer, t in representations.items()}
                if "mean" in include:
                    result["mean_representations"] = {layer: t[i, 1 : truncate_len + 1].mean(0).clone()
                                                      for layer, t in representations.items()}
                if "bos" in include:
                    result["bos_representations"] = {layer: t[i, 0].clone() for layer, t in representations.items()}
                output_file = output_dir / f"{label}.pt"
                output_file.parent.mkdir(parents=True, exist_ok=True)
                torch.save(result, output_file)
