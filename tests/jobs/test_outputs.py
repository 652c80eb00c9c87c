"""Mean, BOS and per-residue outputs of several layers, their storage dtype, and the file's planned size."""

import os
import re
import shutil

import h5py
import numpy as np
import pytest

from extract.output import hdf5_file
from extract.errors import UserError
from fair_esm_reference import fair_esm_tokens
from jobs import job_args, phage_sample, random_proteins, run_extract, run_in_process, write_fasta
from output_checks import read_all

LAYERS = [0, 2, 1]  # what --repr-layers 0 -1 1 means on the 2-layer test model
ALL_OUTPUTS = ["--include", "per_tok", "bos", "mean", "--repr-layers", "0", "-1", "1"]


@pytest.fixture(scope="module")
def phage_runs(tmp_path_factory, tiny_model_path, phage_dir):
    """Real proteins, two of them longer than 1022 residues: every output, in float32 on 2 ranks and
    in float16 on one."""
    tmp = tmp_path_factory.mktemp("outputs")
    records = phage_sample(phage_dir, 7, long=2)
    fasta = write_fasta(tmp / "phage.fasta", records)
    runs = {"records": records, "fasta": fasta}
    for dtype, nproc in (("float32", 2), ("float16", None)):
        out = tmp / f"{dtype}.h5"
        done = run_extract(job_args(tiny_model_path, fasta, out, *ALL_OUTPUTS, "--storage-dtype", dtype,
                                "--toks-per-batch", "2100"), nproc=nproc)
        assert done.returncode == 0, done.stderr
        runs[dtype] = (out, done.stderr)
    return runs


def test_every_output_of_several_layers_matches_fair_esm_truncated_rows_included(phage_runs, fair_esm_tiny):
    records = phage_runs["records"]
    sequences = [seq for _, seq in records]
    data, attrs = read_all(phage_runs["float32"][0])
    model, alphabet = fair_esm_tiny
    expected = fair_esm_tokens(model, alphabet, sequences, LAYERS)  # BOS, then the kept residues

    lengths = np.array([len(seq) for seq in sequences])
    kept = np.minimum(lengths, 1022)
    assert data["lengths"].tolist() == lengths.tolist()
    assert data["truncated"].tolist() == (lengths > 1022).astype(int).tolist() and data["truncated"].sum() == 2
    offsets = data["per_tok/offsets"]
    assert offsets.dtype == np.int64 and offsets.tolist() == [0, *np.cumsum(kept).tolist()]
    for layer in LAYERS:
        per_tok = data[f"per_tok/layer_{layer}"]
        assert per_tok.shape == (kept.sum(), 64) and per_tok.dtype == np.float32
        for row, reps in enumerate(expected):
            assert np.abs(per_tok[offsets[row] : offsets[row + 1]] - reps[layer][1:]).max() <= 1e-4
            assert np.abs(data[f"bos/layer_{layer}"][row] - reps[layer][0]).max() <= 1e-4
            assert np.abs(data[f"mean/layer_{layer}"][row] - reps[layer][1:].mean(0)).max() <= 1e-4
    assert attrs["include"] == '["mean", "bos", "per_tok"]' and attrs["repr_layers"] == "[0, 2, 1]"
    assert attrs["status"] == "complete" and attrs["storage_dtype"] == "float32"


def test_bos_alone_is_fair_esms_bos_and_nothing_else(tmp_path, tiny_model_path, fair_esm_tiny, phage_dir):
    records = phage_sample(phage_dir, 5, long=1)
    out = tmp_path / "bos.h5"
    assert run_in_process(job_args(tiny_model_path, write_fasta(tmp_path / "in.fasta", records), out, "--include",
                                   "bos")) == 0
    model, alphabet = fair_esm_tiny
    expected = fair_esm_tokens(model, alphabet, [seq for _, seq in records], [2])
    data, attrs = read_all(out)
    assert sorted(name for name in data if "/" in name) == ["bos/layer_2"] and attrs["status"] == "complete"
    for row, reps in enumerate(expected):
        assert np.abs(data["bos/layer_2"][row] - reps[2][0]).max() <= 1e-4


def test_flags_given_twice_add_up(tmp_path, tiny_model_path):
    fasta = write_fasta(tmp_path / "in.fasta", random_proteins(3, max_len=40))
    out = tmp_path / "twice.h5"
    assert run_in_process(job_args(tiny_model_path, fasta, out, "--include", "mean", "--include", "bos", "--repr-layers", "0",
                     "--repr-layers", "-1")) == 0
    data, attrs = read_all(out)
    assert sorted(name for name in data if "/" in name) == ["bos/layer_0", "bos/layer_2", "mean/layer_0",
                                                            "mean/layer_2"]
    assert attrs["include"] == '["mean", "bos"]' and attrs["repr_layers"] == "[0, 2]"


def test_float16_is_the_float32_result_rounded_once_in_half_the_file(phage_runs):
    single, _ = read_all(phage_runs["float32"][0])
    half, attrs = read_all(phage_runs["float16"][0])
    assert attrs["storage_dtype"] == "float16"
    assert half.keys() == single.keys()
    for name, values in single.items():
        if name.split("/")[0] in ("mean", "bos", "per_tok") and name != "per_tok/offsets":
            assert half[name].dtype == np.float16, name
            np.testing.assert_array_equal(half[name], values.astype(np.float16), err_msg=name)
        else:
            np.testing.assert_array_equal(half[name], values, err_msg=name)
    sizes = [os.path.getsize(phage_runs[dtype][0]) for dtype in ("float32", "float16")]
    assert 0.45 < sizes[1] / sizes[0] < 0.55


def test_resuming_with_another_storage_dtype_is_refused(phage_runs, tiny_model_path, capsys):
    out = phage_runs["float16"][0]
    before = out.read_bytes()
    args = job_args(tiny_model_path, phage_runs["fasta"], out, *ALL_OUTPUTS, "--storage-dtype", "float32")
    assert run_in_process(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"esm_features: error: {out}: exists and was made from other inputs or settings; "
        f"pass --overwrite to replace it, or choose another --out")
    assert out.read_bytes() == before


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_planned_size_is_printed_and_covers_the_file(phage_runs, dtype):
    out, stderr = phage_runs[dtype]
    data, _ = read_all(out)
    ids, lengths, truncated = [i.decode() for i in data["ids"]], data["lengths"], data["truncated"].astype(bool)
    datasets = [hdf5_file.RowDataset(name, values.shape[1], per_token=name.startswith("per_tok"))
                for name, values in data.items() if name.split("/")[0] in ("mean", "bos", "per_tok")
                and name != "per_tok/offsets"]
    layout = hdf5_file.FileLayout(ids=ids, lengths=lengths, covered=np.where(truncated, 1022, lengths),
                                  datasets=datasets, storage_dtype=dtype)
    planned = layout.planned_bytes()
    assert f"output {out}: {hdf5_file.format_bytes(planned)} planned" in stderr
    assert os.path.getsize(out) <= planned <= os.path.getsize(out) + 64 * 1024 + 16 * len(ids)


def test_job_refuses_to_start_without_room_for_its_output(small_file_system, tmp_path, tiny_model_path, capsys):
    fasta = write_fasta(tmp_path / "in.fasta", random_proteins(8, seed=6, min_len=250, max_len=300))
    out = small_file_system / "out.h5"
    # Every residue of three layers: about 1.6 MiB of per-token rows on a 1 MiB file system.
    assert run_in_process(job_args(tiny_model_path, fasta, out, *ALL_OUTPUTS)) == 2
    refused = capsys.readouterr().err
    assert re.fullmatch(rf"esm_features: error: {out}: the output needs 1\.\d MiB more but its file system has "
                        r"\d+\.\d [KM]iB free; free some space or choose another --out",  # less the input index
                        refused.strip().splitlines()[-1])
    assert "Traceback" not in refused
    assert list(small_file_system.iterdir()) == []
    # The means alone fit, and the same file system takes them.
    assert run_in_process(job_args(tiny_model_path, fasta, out, "--repr-layers", "0", "-1", "1")) == 0
    assert "planned, " in capsys.readouterr().err and h5py.File(out, "r").attrs["status"] == "complete"


def test_an_existing_output_counts_towards_the_room_it_needs(small_file_system):
    out = small_file_system / "out.h5"
    out.write_bytes(os.urandom(512 * 1024))  # a dense half of the file system, resumed or overwritten
    free = shutil.disk_usage(small_file_system).free
    assert hdf5_file.check_room(out, 800 * 1024) == free  # 288 KiB more than it already holds
    with pytest.raises(UserError, match=r"out.h5: the output needs 1\.\d MiB more but its file system has "):
        hdf5_file.check_room(out, 1600 * 1024)


def test_room_check_on_the_real_file_system(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    out = tmp_path / "out.h5"
    with pytest.raises(UserError, match=f"^{out}: the output needs .* more but its file system has .* free; "):
        hdf5_file.check_room(out, free + (256 << 20))
    assert hdf5_file.check_room(out, 1 << 20) > 0
