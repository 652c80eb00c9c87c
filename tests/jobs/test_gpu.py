"""On a CUDA GPU: the packed jagged forward, pooling and the whole job against fair-esm. Skipped without one
(CI has none); run on a machine with a GPU: `python -m pytest tests/jobs/test_gpu.py`."""

import json

import h5py
import numpy as np
import pytest
import torch
from esm.data import BatchConverter

from extract.models.esm2.forward import JAGGED, PADDED, default_attention, embed_batch
from extract.models.esm2.checkpoints import build_random_esm2
from extract.models.esm2.tokens import pack
from fair_esm_reference import fair_esm_means, load_fair_esm
from jobs import job_args, phage_sample, run_extract, write_fasta

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def real_sequences(phage_dir):
    return [seq for _, seq in phage_sample(phage_dir, 24, long=2)]


@pytest.mark.parametrize("attention", [JAGGED, PADDED])
def test_fp32_rows_on_the_gpu_match_fair_esm(tiny_model_path, real_sequences, attention):
    model, alphabet = load_fair_esm(tiny_model_path)  # its own: moved to the GPU below
    _, _, tokens = BatchConverter(alphabet, 1022)([(str(i), s) for i, s in enumerate(real_sequences)])
    real = tokens.ne(alphabet.padding_idx)
    with torch.inference_mode():
        expected = model(tokens, repr_layers=[0, 2])["representations"]
        rows = embed_batch(model.to(CUDA), pack(alphabet, real_sequences, 1022), [0, 2], attention)
    assert default_attention(CUDA, torch.float32) == JAGGED  # the dtype of this test's model
    for layer in (0, 2):
        assert rows[layer].device.type == "cuda"
        assert (rows[layer].cpu() - expected[layer][real]).abs().max() <= 1e-4


def test_bf16_means_on_the_gpu_match_fp32_fair_esm(real_sequences):
    model = build_random_esm2(6, 320, 20).eval()
    expected = fair_esm_means(model, model.alphabet, real_sequences, [6])[6]
    batch = pack(model.alphabet, real_sequences, 1022)
    offsets = batch.offsets
    with torch.inference_mode():
        rows = embed_batch(model.to(CUDA, torch.bfloat16), batch, [6])
    means = torch.stack([rows[6][offsets[i] + 1: offsets[i + 1] - 1].float().mean(0) for i in range(len(offsets) - 1)])
    cosine = torch.nn.functional.cosine_similarity(means.cpu(), torch.from_numpy(expected), dim=1)
    assert cosine.min() >= 0.999, cosine


def test_a_job_on_the_gpu_writes_fair_esms_means_with_an_automatic_budget(tmp_path, tiny_model_path, fair_esm_tiny,
                                                                            phage_dir):
    records = phage_sample(phage_dir, 24, long=2)
    fasta = write_fasta(tmp_path / "in.fasta", records)
    out, report = tmp_path / "out.h5", tmp_path / "report.json"
    done = run_extract(job_args(tiny_model_path, fasta, out, "--device", "cuda", "--dtype", "fp32", "--report", report))
    assert done.returncode == 0, done.stderr
    model, alphabet = fair_esm_tiny
    expected = fair_esm_means(model, alphabet, [seq for _, seq in records], [2])[2]
    with h5py.File(out, "r") as f:
        assert np.abs(f["mean/layer_2"][()] - expected).max() <= 1e-4
    run = json.loads(report.read_text())
    assert run["ranks"][0]["device"].startswith("cuda") and run["total"]["peak_device_bytes"] > 0
    assert run["settings"]["toks_per_batch"] >= 2048  # sized from free memory, at least the seed plan's
    assert run["total"]["residue_share_of_tokens"] >= 0.95
