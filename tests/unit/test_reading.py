"""extract/reading.py: embeddings in input order and by id."""

import shutil

import h5py
import numpy as np
import pytest

from extract.data.fasta import read_inputs
from extract.reading import Embeddings
from fair_esm_reference import fair_esm_means, fair_esm_representations
from jobs import ESM2_ALPHABET


def test_in_input_order_is_fair_esms_mean_for_each_fasta_record(single_process_run, capsid_fasta, fair_esm_tiny):
    inputs = read_inputs([capsid_fasta], ESM2_ALPHABET)
    model, alphabet = fair_esm_tiny
    expected = fair_esm_means(model, alphabet, inputs.sequences, [2])[2]
    with Embeddings(single_process_run.out) as emb:
        assert emb.ids == inputs.ids and emb.layers() == [2] and emb.done.all()
        assert np.abs(emb.in_input_order() - expected).max() <= 1e-4
        np.testing.assert_array_equal(emb.in_input_order(layer=2), emb.in_input_order())


def test_residues_are_fair_esms_per_residue_representations(single_process_run, capsid_fasta, fair_esm_tiny):
    inputs = read_inputs([capsid_fasta], ESM2_ALPHABET)
    model, alphabet = fair_esm_tiny
    expected = fair_esm_representations(model, alphabet, inputs.sequences[:3], [2])
    with Embeddings(single_process_run.out) as emb:
        assert emb.layers("per_tok") == [2]
        for protein, reference in zip(inputs.ids, expected):
            residues = emb.residues(protein)
            assert residues.shape == reference[2].shape
            assert np.abs(residues - reference[2]).max() <= 1e-4
        with pytest.raises(ValueError, match="per_tok holds one row per residue; use residues\\(id\\)"):
            emb.by_id([inputs.ids[0]], kind="per_tok")


def test_by_id_returns_rows_in_the_order_named(single_process_run):
    with Embeddings(single_process_run.out) as emb:
        everything = emb.in_input_order()
        named = [emb.ids[7], emb.ids[0], emb.ids[7]]
        np.testing.assert_array_equal(emb.by_id(named), everything[[7, 0, 7]])
        assert emb.by_id([]).shape == (0, everything.shape[1])


def test_unknown_ids_and_layers_are_named(single_process_run):
    with Embeddings(single_process_run.out) as emb:
        with pytest.raises(KeyError, match="no protein with id 'nobody' \\(and 1 more ids missing\\)"):
            emb.by_id(["nobody", emb.ids[0], "nobody_else"])
        with pytest.raises(KeyError, match="no mean embeddings of layer 1; it holds layers \\[2\\]"):
            emb.in_input_order(layer=1)
        with pytest.raises(KeyError, match="no 'bos' embeddings; it holds \\['mean', 'per_tok'\\]"):
            emb.layers("bos")


def test_residues_of_an_output_without_them_are_named(tmp_path, single_process_run):
    path = shutil.copy(single_process_run.out, tmp_path / "means_only.h5")
    with h5py.File(path, "r+") as f:  # as an output made without --include per_tok
        del f["per_tok"]
    with Embeddings(path) as emb, pytest.raises(KeyError, match="no 'per_tok' embeddings; it holds \\['mean'\\]"):
        emb.residues(emb.ids[0])


def test_an_unfinished_output_is_refused_unless_allowed(tmp_path, single_process_run):
    path = shutil.copy(single_process_run.out, tmp_path / "unfinished.h5")
    with h5py.File(path, "r+") as f:
        f["done"][4] = 0
        f.attrs["status"] = "incomplete"
    with pytest.raises(ValueError, match="has not finished \\(status 'incomplete'\\)"):
        Embeddings(path)
    with Embeddings(path, allow_incomplete=True) as emb:
        assert np.flatnonzero(~emb.done).tolist() == [4]
