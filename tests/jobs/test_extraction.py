"""The extraction job end to end: real processes, real torchrun, real HDF5 files."""

import json
import shutil

import h5py
import numpy as np
import pytest

from extract.output import hdf5_file
from fair_esm_reference import fair_esm_means
from jobs import job_args, phage_sample, random_proteins, run_extract, run_in_process, write_fasta
from output_checks import read_all


def test_two_ranks_match_fair_esm_on_real_proteins(tmp_path, tiny_model_path, fair_esm_tiny, phage_dir):
    records = phage_sample(phage_dir, 24, long=3)
    fasta = write_fasta(tmp_path / "phage.fasta", records)
    out, report = tmp_path / "out.h5", tmp_path / "report.json"
    done = run_extract(job_args(tiny_model_path, [fasta], out, "--repr-layers", "0", "1", "-1",
                            "--toks-per-batch", "3000", "--report", report), nproc=2)
    assert done.returncode == 0, done.stderr
    data, attrs = read_all(out)
    model, alphabet = fair_esm_tiny
    expected = fair_esm_means(model, alphabet, [seq for _, seq in records], [0, 1, 2])
    assert [i.decode() for i in data["ids"]] == [rid for rid, _ in records]
    assert data["lengths"].tolist() == [len(seq) for _, seq in records]
    for layer in (0, 1, 2):
        assert np.abs(data[f"mean/layer_{layer}"] - expected[layer]).max() <= 1e-4
    assert attrs["status"] == "complete"
    total = json.loads(report.read_text())["total"]
    # Packed batches: only BOS and EOS are computed besides the residues (the long ones' first 1022), once
    # per distinct sequence.
    distinct = {seq for _, seq in records}
    assert total["residues_embedded"] == sum(min(len(seq), 1022) for seq in distinct)
    assert total["tokens"] == total["residues_embedded"] + 2 * len(distinct)
    assert total["residue_share_of_tokens"] >= 0.95
    assert "rows per rank [" in done.stderr and "[rank 0/2]" in done.stderr and "[rank 1/2]" in done.stderr


def test_one_two_and_three_ranks_write_the_same_file(tmp_path, tiny_model_path):
    fasta = [write_fasta(tmp_path / "a.fasta", random_proteins(30, seed=1)),
             write_fasta(tmp_path / "b.fasta", random_proteins(25, seed=2))]

    def args(out):
        return job_args(tiny_model_path, fasta, out, "--toks-per-batch", "1000")

    assert run_in_process(args(tmp_path / "out_1.h5")) == 0  # one rank: the same code as a plain process
    single, single_attrs = read_all(tmp_path / "out_1.h5")
    for nproc in (2, 3):
        out = tmp_path / f"out_{nproc}.h5"
        done = run_extract(args(out), nproc=nproc)
        assert done.returncode == 0, done.stderr
        data, attrs = read_all(out)
        assert data.keys() == single.keys()
        for name in single:
            np.testing.assert_array_equal(data[name], single[name], err_msg=name)
        assert attrs["fingerprint"] == single_attrs["fingerprint"]
        assert attrs["status"] == "complete"


def test_output_layout_and_attributes(tmp_path, tiny_model_path):
    records = random_proteins(12, seed=3)
    fasta = write_fasta(tmp_path / "in.fasta", records)
    out = tmp_path / "out.h5"
    assert run_in_process(job_args(tiny_model_path, [fasta], out, "--repr-layers", "-1", "1")) == 0
    with h5py.File(out, "r") as f:
        assert set(f) == {"ids", "lengths", "truncated", "done", "mean"}
        assert set(f["mean"]) == {"layer_2", "layer_1"}
        assert f["mean/layer_2"].shape == (12, 64) and f["mean/layer_2"].dtype == np.float32
        assert f["lengths"].dtype == np.int64 and f["done"].dtype == np.uint8
        assert f["done"][()].tolist() == [1] * 12
        assert f["ids"].asstr()[()].tolist() == [rid for rid, _ in records]
        attrs = dict(f.attrs)
    assert attrs["status"] == "complete"
    assert attrs["model"] == "tiny_esm2" and not attrs["random_weights"]
    assert (attrs["num_layers"], attrs["embed_dim"], attrs["truncation_seq_length"]) == (2, 64, 1022)
    assert attrs["repr_layers"] == "[2, 1]" and attrs["compute_dtype"] == "fp32"
    assert attrs["toks_per_batch"] == 4096 and attrs["format_version"] == 1
    assert attrs["include"] == '["mean"]' and attrs["long_sequences"] == "truncate"
    assert attrs["storage_dtype"] == "float32"
    assert attrs["tool"].startswith("esm-features") and len(attrs["fingerprint"]) == 64


def test_random_weights_are_recorded(tmp_path, capsys):
    fasta = write_fasta(tmp_path / "in.fasta", random_proteins(3, seed=4, max_len=40))
    out = tmp_path / "out.h5"
    assert run_in_process(job_args("random:esm2_t6_8M_UR50D", [fasta], out)) == 0
    _, attrs = read_all(out)
    assert attrs["model"] == "esm2_t6_8M_UR50D" and attrs["random_weights"]
    assert "(random weights)" in capsys.readouterr().err


def test_status_stays_incomplete_until_every_row_is_done(tmp_path, tiny_model_path):
    fasta = write_fasta(tmp_path / "in.fasta", random_proteins(6, seed=5))
    out = tmp_path / "out.h5"
    assert run_in_process(job_args(tiny_model_path, [fasta], out)) == 0
    with h5py.File(out, "r+") as f:  # as if a rank died before writing its last row
        f["done"][3] = 0
        f.attrs["status"] = hdf5_file.INCOMPLETE
    assert hdf5_file.mark_complete(out, {}).tolist() == [3]
    _, attrs = read_all(out)
    assert attrs["status"] == "incomplete"


@pytest.mark.parametrize("flag, message", [
    (["--repr-layers", "7"], "--repr-layers 7: the model has layers 0 to 2 (or -3 to -1 counted from the end)"),
    (["--model", "no_such_model.pt"], "model no_such_model.pt: no such file"),
    (["--progress-seconds", "inf"], "argument --progress-seconds: 'inf' is not a positive number of seconds"),
], ids=["layer", "model", "progress"])
def test_usage_errors_are_one_line_and_exit_2(tmp_path, tiny_model_path, capsys, flag, message):
    fasta = write_fasta(tmp_path / "in.fasta", random_proteins(2))
    out = tmp_path / "out.h5"
    assert run_in_process(job_args(tiny_model_path, [fasta], out, *flag)) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"esm_features: error: {message}")
    assert "Traceback" not in err
    assert not out.exists()


def test_a_rank_without_a_rendezvous_is_one_line_and_exits_2(tmp_path, tiny_model_path):
    fasta = write_fasta(tmp_path / "in.fasta", random_proteins(2))
    out = tmp_path / "out.h5"
    done = run_extract(job_args(tiny_model_path, [fasta], out),
                       extra_env={"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(
        "esm_features: error: environment: cannot join the process group (Error initializing torch.distributed "
        "using env:// rendezvous: environment variable MASTER_ADDR expected, but not set); start with torchrun")
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_reference_attention_gives_fair_esm_numbers_too(tmp_path, tiny_model_path, fair_esm_tiny):
    records = random_proteins(10, seed=6)
    fasta = write_fasta(tmp_path / "in.fasta", records)
    model, alphabet = fair_esm_tiny
    expected = fair_esm_means(model, alphabet, [seq for _, seq in records], [2])[2]
    real_tokens = sum(len(seq) + 2 for _, seq in records)
    for attention in ("fast", "reference"):
        out, report = tmp_path / f"{attention}.h5", tmp_path / f"{attention}.json"
        assert run_in_process(job_args(tiny_model_path, [fasta], out, "--attention", attention, "--report",
                                       report)) == 0
        data, _ = read_all(out)
        assert np.abs(data["mean/layer_2"] - expected).max() <= 1e-4, attention
        tokens = json.loads(report.read_text())["total"]["tokens"]
        # The fast forward packs the batch; fair-esm's computes it padded to its longest protein.
        assert tokens == real_tokens if attention == "fast" else tokens > real_tokens


def test_fair_esm_name_loads_from_the_hub_cache_on_every_rank(tmp_path, tiny_model_path, fair_esm_tiny):
    """A name resolves to torch's hub cache ($TORCH_HOME/hub/checkpoints/NAME.pt); no download when it is there."""
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    shutil.copy(tiny_model_path, cache / "esm2_t6_8M_UR50D.pt")
    records = random_proteins(8, seed=7)
    fasta = write_fasta(tmp_path / "in.fasta", records)
    out = tmp_path / "out.h5"
    done = run_extract(job_args("esm2_t6_8M_UR50D", [fasta], out), nproc=2,
                       extra_env={"TORCH_HOME": str(tmp_path / "torch_home")})
    assert done.returncode == 0, done.stderr
    data, attrs = read_all(out)
    assert attrs["model"] == "esm2_t6_8M_UR50D" and not attrs["random_weights"]
    model, alphabet = fair_esm_tiny
    expected = fair_esm_means(model, alphabet, [seq for _, seq in records], [2])[2]
    assert np.abs(data["mean/layer_2"] - expected).max() <= 1e-4
