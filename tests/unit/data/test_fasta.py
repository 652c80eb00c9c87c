"""Reading FASTA: what is accepted reads the same however it is written and however it is cut into
blocks; what is refused gets one line naming the file, the record and the problem."""

import gzip

import numpy as np
import pytest
from Bio.SeqIO.FastaIO import SimpleFastaParser

from extract.data import fasta
from extract.errors import UserError
from jobs import ESM2_ALPHABET, random_proteins, write_fasta

MESSY = (
    "\n  \n>first protein\tkinase  \r\nmkv*\r\n"
    ">second  description with UTF-8: 37 °C, Zürich, αβ\nACDEF\nGHIKL\n\nMNPQR*\n"
    ">  third has a space before its id\nxbzuo\n"
    ">fourth\x1cseparated\r  W Y\t \rVV\r"
    ">fifth\n" + "a" * 5000 + "\n"
    ">sixth\x01id\nM"
)
CLEAN = [("first", "MKV"), ("second", "ACDEFGHIKLMNPQR"), ("third", "XBZUO"), ("fourth", "WYVV"),
         ("fifth", "A" * 5000), ("sixth\x01id", "M")]


def _records(paths, block_bytes=fasta.BLOCK_BYTES):
    records = []
    for block in fasta.read_blocks(paths, ESM2_ALPHABET, block_bytes):
        ends = np.cumsum(block.lengths + 1)
        sequences = [block.sequences[a:b].decode() for a, b in zip(ends - block.lengths, ends)]
        assert block.sequences[:1] in (b">", b"") and block.sequences.count(b">") == len(block)
        records += zip(block.ids.decode().split("\n")[:-1], sequences)
    return records


@pytest.mark.parametrize("block_bytes", [1, 7, 64, fasta.BLOCK_BYTES])
def test_messy_input_reads_as_its_clean_form_in_blocks_of_any_size(tmp_path, block_bytes):
    path = tmp_path / "messy.fasta"
    path.write_bytes(MESSY.encode())
    assert _records([path], block_bytes) == CLEAN


def test_equal_to_biopython_on_many_records_and_gzip(tmp_path):
    records = random_proteins(500, seed=9, min_len=1, max_len=400)
    plain = write_fasta(tmp_path / "a.fasta", records)
    zipped = tmp_path / "a.fasta.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    with open(plain) as handle:
        expected = [(title.split()[0], seq) for title, seq in SimpleFastaParser(handle)]
    assert _records([plain], 4096) == expected
    assert _records([zipped, plain], 100) == expected + expected


def test_numbers_records_per_file_across_blocks(tmp_path):
    good = write_fasta(tmp_path / "good.fasta", random_proteins(40, seed=1))
    bad = tmp_path / "bad.fasta"
    bad.write_text("".join(f">r{i}\nMKV\n" for i in range(1, 30)) + ">r30 x\nMK-V\n>r31\nMKV\n")
    with pytest.raises(UserError) as err:
        list(fasta.read_blocks([good, bad], ESM2_ALPHABET, 50))
    assert str(err.value) == f"{bad}: record 30 (r30): character(s) '-' not in the ESM-2 protein alphabet"
    assert err.value.exit_code == 2


@pytest.mark.parametrize("content, problem", [
    ("", "the file is empty"),
    (" \n\r\n\t\n", "the file is empty"),
    ("MKV\n>a\nMKV\n", "not a FASTA file (the first line does not start with '>')"),
    ("  >a\nMKV\n", "not a FASTA file (the first line does not start with '>')"),
    ("\x89PNG\r\n\x1a\n\xff\xfe", "not a FASTA file (the first line does not start with '>')"),
    ("\x89>a\xe9 id not UTF-8\nMKV\n", "not a FASTA file (the first line does not start with '>')"),
    (">a\xe9\x89 id not UTF-8\nMKV\n", "record 1: the id is not UTF-8 text"),
    (">a\nMK\xe9\x89V\n", "record 1 (a): the sequence is not UTF-8 text (a byte outside the ESM-2 protein alphabet)"),
    (">a\nMKV\n>b\n\n>c\nMKV\n", "record 2 (b): the record has no sequence"),
    (">a\nMKV\n>b\n*\n", "record 2 (b): the record has no sequence"),
    (">a\nMKV\n>\nMKV\n", "record 2: the header has no id"),
    (">a\nMKV\n>  \nMKV\n", "record 2: the header has no id"),
    (">a\nMK*V\n", "record 1 (a): character(s) '*' not in the ESM-2 protein alphabet"),
    (">a\nMKV**\n", "record 1 (a): character(s) '*' not in the ESM-2 protein alphabet"),
    (">a\nMK>V\n", "record 1 (a): character(s) '>' not in the ESM-2 protein alphabet"),
    (">a\nmkjv1\n", "record 1 (a): character(s) '1J' not in the ESM-2 protein alphabet"),
    (">a\nMK-.V\n", "record 1 (a): character(s) '-.' not in the ESM-2 protein alphabet"),
    (">a\nMKßV\n", "record 1 (a): character(s) 'ß' not in the ESM-2 protein alphabet"),
    (">a\nMK\x00V\n", "record 1 (a): character(s) '\\x00' not in the ESM-2 protein alphabet"),
])
def test_bad_input_is_refused_with_one_line(tmp_path, content, problem):
    path = tmp_path / "in.fasta"
    path.write_bytes(content.encode("latin-1") if "\x89" in content else content.encode())
    with pytest.raises(UserError) as err:
        list(fasta.read_blocks([path], ESM2_ALPHABET))
    assert str(err.value) == f"{path}: {problem}"
    assert err.value.exit_code == 2


def test_missing_file_and_truncated_gzip(tmp_path):
    with pytest.raises(UserError, match=f"^{tmp_path}/nothing.fasta: no such file$") as err:
        list(fasta.read_blocks([tmp_path / "nothing.fasta"], ESM2_ALPHABET))
    assert err.value.exit_code == 2
    path = tmp_path / "cut.fasta.gz"
    path.write_bytes(gzip.compress(b">a\nMKV\n" * 10000)[:-20])
    with pytest.raises(UserError) as err:
        list(fasta.read_blocks([path], ESM2_ALPHABET))
    assert str(err.value).startswith(f"{path}: the gzip stream is truncated or corrupt (")
    assert err.value.exit_code == 2
