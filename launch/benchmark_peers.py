"""The benchmark's peers: transformers' `EsmModel` with SDPA and esm.cpp, on the same weights as fair-esm.

Each runs as a whole process of its own (`python launch/benchmark_peers.py PEER ...`, importing only what
that peer needs: esm.cpp's process never imports torch), as a user would run it: the
model loaded from the fair-esm checkpoint's weights converted once to its layout (`save_hugging_face`,
`save_esm_cpp`),
the proteins batched as fair-esm's extract batches them (`batches.json`, from its `get_batch_indices`),
the mean of the last layer over each protein's residues kept in memory and saved in one `.npy`. Neither
package is a dependency of the job: both are optional extras of the benchmark (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np
from Bio.SeqIO.FastaIO import SimpleFastaParser

REPO = Path(__file__).resolve().parents[1]

PEERS = {  # name -> the module it needs
    "transformers": "transformers",
    "esm-cpp": "esm_cpp",
    "esm-cpp-int8": "esm_cpp",
}
TRUNCATION = 1022
# fair-esm's ESM-2 parameter names -> transformers' EsmForMaskedLM's (its own conversion script is not shipped).
HUGGING_FACE_NAMES = [
    (r"^embed_tokens\.", "esm.embeddings.word_embeddings."),
    (r"^layers\.(\d+)\.self_attn\.q_proj\.", r"esm.encoder.layer.\1.attention.self.query."),
    (r"^layers\.(\d+)\.self_attn\.k_proj\.", r"esm.encoder.layer.\1.attention.self.key."),
    (r"^layers\.(\d+)\.self_attn\.v_proj\.", r"esm.encoder.layer.\1.attention.self.value."),
    (r"^layers\.(\d+)\.self_attn\.out_proj\.", r"esm.encoder.layer.\1.attention.output.dense."),
    (r"^layers\.(\d+)\.self_attn_layer_norm\.", r"esm.encoder.layer.\1.attention.LayerNorm."),
    (r"^layers\.(\d+)\.fc1\.", r"esm.encoder.layer.\1.intermediate.dense."),
    (r"^layers\.(\d+)\.fc2\.", r"esm.encoder.layer.\1.output.dense."),
    (r"^layers\.(\d+)\.final_layer_norm\.", r"esm.encoder.layer.\1.LayerNorm."),
    (r"^emb_layer_norm_after\.", "esm.encoder.emb_layer_norm_after."),
    (r"^contact_head\.", "esm.contact_head."),
    (r"^lm_head\.weight$", "lm_head.decoder.weight"),
]


# The oldest major version each peer's code here runs with (transformers 4 lays out ESM's weights otherwise).
OLDEST_MAJOR = {"transformers": 5}


def missing_module(peer: str) -> str | None:
    """Why `peer` cannot run here, or None when it can."""
    module = PEERS[peer]
    if not importlib.util.find_spec(module):
        return f"{module} is not installed (pip install -e '.[bench]')"
    version = importlib.metadata.version(module)
    if int(version.split(".")[0]) < OLDEST_MAJOR.get(module, 0):
        return f"{module} {version} is older than {OLDEST_MAJOR[module]} (pip install -e '.[bench]')"
    return None


def hugging_face_state_dict(fair_esm_state: dict) -> dict:
    """fair-esm's ESM-2 state dict under transformers' names (each layer's rotary buffer becomes the one)."""
    state = {}
    for name, tensor in fair_esm_state.items():
        if name.endswith("rot_emb.inv_freq"):
            state["esm.rotary_embeddings.inv_freq"] = tensor
            continue
        for pattern, replacement in HUGGING_FACE_NAMES:
            name, found = re.subn(pattern, replacement, name)
            if found:
                break
        state[name] = tensor
    return state


def save_hugging_face(model, alphabet, directory: Path) -> None:
    """fair-esm's ESM-2 `model` as a transformers EsmForMaskedLM directory (config, safetensors, tokenizer)."""
    from transformers import EsmConfig, EsmForMaskedLM, EsmTokenizer

    config = EsmConfig(vocab_size=len(alphabet.all_toks), hidden_size=model.embed_dim,
                       num_hidden_layers=model.num_layers, num_attention_heads=model.attention_heads,
                       intermediate_size=4 * model.embed_dim, hidden_act="gelu",
                       layer_norm_eps=model.emb_layer_norm_after.eps, position_embedding_type="rotary",
                       max_position_embeddings=TRUNCATION + 4, token_dropout=model.token_dropout,
                       emb_layer_norm_before=False, pad_token_id=alphabet.padding_idx,
                       mask_token_id=alphabet.mask_idx)
    hugging_face = EsmForMaskedLM(config)
    hugging_face.load_state_dict(hugging_face_state_dict(model.state_dict()), strict=True)
    hugging_face.save_pretrained(directory)
    vocabulary = directory / "vocab.txt"
    vocabulary.write_text("".join(f"{token}\n" for token in alphabet.all_toks))
    EsmTokenizer(str(vocabulary), model_max_length=TRUNCATION + 2).save_pretrained(directory)


def save_esm_cpp(model, path: Path) -> None:
    """The same weights as one safetensors file in the layout esm.cpp 0.2 reads (transformers 4's: a rotary
    buffer per layer, the LM head's decoder weight stored, not tied)."""
    from safetensors.torch import save_file

    state = hugging_face_state_dict(model.state_dict())
    inv_freq = state.pop("esm.rotary_embeddings.inv_freq")
    state.update({f"esm.encoder.layer.{layer}.attention.self.rotary_embeddings.inv_freq": inv_freq
                  for layer in range(model.num_layers)})
    save_file({name: tensor.clone().contiguous() for name, tensor in state.items()}, path)


def read_proteins(fasta: Path) -> tuple[list[str], list[str]]:
    with open(fasta) as handle:
        records = [(title.split()[0], sequence) for title, sequence in SimpleFastaParser(handle)]
    return [protein for protein, _ in records], [sequence for _, sequence in records]


def _stats(residues: int, tokens: int, started: float) -> dict:
    return {"residues": residues, "tokens": tokens, "seconds": time.perf_counter() - started,
            "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_device_bytes": None}


def transformers_extract(model_dir: Path, fasta: Path, batches: Path, out: Path, dtype: str, device: str) -> dict:
    """transformers' EsmModel with SDPA attention in `dtype`, fair-esm's batches, padded with an attention mask."""
    import torch
    from transformers import AutoTokenizer, EsmModel

    sys.path.insert(0, str(REPO))
    from extract.runtime.device import DTYPES

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = EsmModel.from_pretrained(model_dir, dtype=DTYPES[dtype], attn_implementation="sdpa",
                                     add_pooling_layer=False).eval().to(device)
    _, sequences = read_proteins(fasta)
    means = np.zeros((len(sequences), model.config.hidden_size), dtype=np.float32)
    residues = tokens = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in json.loads(batches.read_text()):
            encoded = tokenizer([sequences[i] for i in batch], padding=True, truncation=True,
                                max_length=TRUNCATION + 2, return_tensors="pt").to(device)
            hidden = model(**encoded).last_hidden_state.float().cpu()
            tokens += encoded["input_ids"].numel()
            for row, protein in enumerate(batch):
                length = min(TRUNCATION, len(sequences[protein]))
                means[protein] = hidden[row, 1 : length + 1].mean(0).numpy()
                residues += length
    if device == "cuda":
        torch.cuda.synchronize()
    np.save(out / "means.npy", means)
    return _stats(residues, tokens, started)


def esm_cpp_extract(weights: Path, fasta: Path, out: Path, quantized: bool) -> dict:
    """esm.cpp on the CPU (fp32, or int8 after its `quantize_weights()`, uncalibrated), one protein at a time:
    its forward that returns hidden states takes one sequence (its packed forwards return only logits)."""
    import esm_cpp

    model = esm_cpp.Model.load_from_safetensors(str(weights))
    if quantized:
        model.quantize_weights()
    tokenizer = esm_cpp.Tokenizer()
    _, sequences = read_proteins(fasta)
    means = np.zeros((len(sequences), model.config.hidden_size), dtype=np.float32)
    residues = tokens = 0
    started = time.perf_counter()
    for protein, sequence in enumerate(sequences):
        length = min(TRUNCATION, len(sequence))
        ids = np.asarray(tokenizer.encode(sequence[:length]), dtype=np.int32)
        _, hidden = model.forward_with_hidden_states(ids)
        means[protein] = hidden[-1][1 : length + 1].mean(0)
        residues, tokens = residues + length, tokens + len(ids)
    np.save(out / "means.npy", means)
    return _stats(residues, tokens, started)


def main(argv: list[str] | None = None) -> int:
    """One peer's run, as launch/benchmark.py starts it; prints its figures as one JSON line."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("peer", choices=list(PEERS))
    parser.add_argument("--weights", type=Path, required=True, help="transformers: its directory; esm.cpp: a file")
    parser.add_argument("--fasta", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True, help="where means.npy goes")
    parser.add_argument("--batches", type=Path, help="transformers: the batches, a JSON list of lists of rows")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="transformers' dtype")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="transformers' device")
    args = parser.parse_args(argv)
    if args.peer == "transformers":
        stats = transformers_extract(args.weights, args.fasta, args.batches, args.out_dir, args.dtype, args.device)
    else:
        stats = esm_cpp_extract(args.weights, args.fasta, args.out_dir, quantized=args.peer == "esm-cpp-int8")
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
