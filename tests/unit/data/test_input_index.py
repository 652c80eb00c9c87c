"""The input index: built in one pass, saved next to the output, reused while the inputs are unchanged."""

import os

import numpy as np
import pytest

from extract.data import input_index
from extract.errors import UserError
from jobs import ESM2_ALPHABET, write_fasta

RECORDS = [("a", "MKV"), ("b", "mkv*"), ("c", "ACDE"), ("d", "MK\nV"), ("e", "ACDE"), ("f", "W")]


def test_rows_with_the_same_normalised_sequence_point_to_the_first(tmp_path):
    index = input_index.build([write_fasta(tmp_path / "in.fasta", RECORDS)], ESM2_ALPHABET, None)
    assert index.lengths.tolist() == [3, 3, 4, 3, 4, 1]
    assert index.representatives.tolist() == [0, 0, 2, 0, 2, 5]
    assert index.distinct == 3 and index.directory is None


def test_digest_follows_ids_and_sequences_not_how_they_are_written(tmp_path):
    digest = input_index.build([write_fasta(tmp_path / "a.fasta", RECORDS)], ESM2_ALPHABET, None).digest
    rewritten = [(rid, seq.replace("\n", "").upper().rstrip("*")) for rid, seq in RECORDS]
    assert input_index.build([write_fasta(tmp_path / "b.fasta", rewritten)], ESM2_ALPHABET, None).digest == digest
    split = [write_fasta(tmp_path / "c.fasta", RECORDS[:2]), write_fasta(tmp_path / "d.fasta", RECORDS[2:])]
    assert input_index.build(split, ESM2_ALPHABET, None).digest == digest
    renamed = [("z", "MKV"), *RECORDS[1:]]
    assert input_index.build([write_fasta(tmp_path / "e.fasta", renamed)], ESM2_ALPHABET, None).digest != digest
    changed = [("a", "MKW"), *RECORDS[1:]]
    assert input_index.build([write_fasta(tmp_path / "f.fasta", changed)], ESM2_ALPHABET, None).digest != digest


def test_saved_index_is_reused_until_an_input_changes(tmp_path):
    fasta = write_fasta(tmp_path / "in.fasta", RECORDS)
    directory = input_index.directory_for(tmp_path / "out.h5")
    assert input_index.prepare([fasta], ESM2_ALPHABET, directory) is False
    assert input_index.prepare([fasta], ESM2_ALPHABET, directory) is True
    index = input_index.load(directory)
    assert index.ids[:] == list("abcdef") and index.ids[2:4] == ["c", "d"] and index.ids[5] == "f"
    with index.sequences() as store:
        assert store.fetch(np.array([5, 1, 4])) == ["W", "MKV", "ACDE"]
    os.utime(fasta, ns=(0, 0))
    assert input_index.saved_if_current([fasta], ESM2_ALPHABET, directory) is None
    assert input_index.prepare([fasta], ESM2_ALPHABET, directory) is False
    assert sorted(os.listdir(tmp_path)) == ["in.fasta", "out.h5.inputs"]


def test_a_saved_index_missing_sequences_is_built_again(tmp_path):
    fasta = write_fasta(tmp_path / "in.fasta", RECORDS)
    directory = input_index.directory_for(tmp_path / "out.h5")
    input_index.prepare([fasta], ESM2_ALPHABET, directory)
    stored = (directory / input_index.SEQUENCES).read_bytes()
    (directory / input_index.SEQUENCES).write_bytes(stored[:-1])  # a copy cut short, a full disk
    assert input_index.saved_if_current([fasta], ESM2_ALPHABET, directory) is None
    assert input_index.prepare([fasta], ESM2_ALPHABET, directory) is False
    assert (directory / input_index.SEQUENCES).read_bytes() == stored
    assert input_index.prepare([fasta], ESM2_ALPHABET, directory) is True


def test_bad_input_leaves_no_index_behind(tmp_path):
    fasta = write_fasta(tmp_path / "in.fasta", [("a", "MKV"), ("a", "MKW")])
    with pytest.raises(UserError) as err:
        input_index.prepare([fasta], ESM2_ALPHABET, input_index.directory_for(tmp_path / "out.h5"))
    assert str(err.value) == f"{fasta}: record 2 (a): duplicate id, first seen at {fasta}: record 1 (a)"
    assert err.value.exit_code == 2 and os.listdir(tmp_path) == ["in.fasta"]


def test_digests_that_share_a_first_half_are_still_grouped_exactly():
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 2**63, (40, 2)).astype(np.uint64)[rng.integers(0, 40, 500)]
    keys[::3, 0] = keys[0, 0]
    first = {}
    expected = [first.setdefault(tuple(key), row) for row, key in enumerate(keys.tolist())]
    assert input_index._representatives(keys.tobytes()).tolist() == expected
