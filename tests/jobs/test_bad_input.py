"""DESIGN.md's bad input, refused before any output exists; and its accepted forms, embedded like the clean form.

In-process through `main(argv)`, the documented entry point for jobs that run their own process group:
the same code path as the script, without a process start per case.
"""

import gzip
import os

import numpy as np
import pytest
from Bio.SeqIO.FastaIO import SimpleFastaParser

from fair_esm_reference import fair_esm_means
from jobs import job_args, run_in_process
from output_checks import read_all


@pytest.fixture(scope="module")
def records(phage_dir):
    """Six minor-capsid proteins, (id, description, sequence)."""
    with open(phage_dir / "minor_capsid.fasta") as handle:
        parsed = [(title.split(maxsplit=1), seq) for title, seq in SimpleFastaParser(handle)][:6]
    return [(words[0], words[1], seq) for words, seq in parsed]


def _fasta(records, sequence=lambda seq: seq, header=lambda rid, desc: f">{rid} {desc}", newline="\n"):
    return "".join(f"{header(rid, desc)}{newline}{sequence(seq)}{newline}" for rid, desc, seq in records)


def _wrapped(seq, width=60):
    return "\n".join(seq[i:i + width] for i in range(0, len(seq), width))


def _run(tmp_path, model, fasta_paths, *extra):
    out = tmp_path / "out" / "out.h5"
    out.parent.mkdir(exist_ok=True)
    code = run_in_process(job_args(model, fasta_paths, out, *extra))
    return code, out


def _embeddings(out):
    data, attrs = read_all(out)
    return [i.decode() for i in data["ids"]], data["mean/layer_2"], attrs["fingerprint"], attrs["status"]


ACCEPTED = {
    "lowercase": lambda recs: _fasta(recs, sequence=str.lower).encode(),
    "crlf": lambda recs: _fasta(recs, newline="\r\n").encode(),
    "blank lines": lambda recs: ("\n\n" + _fasta(recs, sequence=lambda s: s[:50] + "\n\n" + s[50:])
                                 .replace("\n>", "\n\n\n>")).encode(),
    "wrapped at 60": lambda recs: _fasta(recs, sequence=_wrapped).encode(),
    "terminal stop": lambda recs: _fasta(recs, sequence=lambda s: s + "*").encode(),
    "any description": lambda recs: _fasta(recs, header=lambda rid, d: f">{rid}\t{d} | ß→α >x; [ÆØ]").encode(),
    "latin-1 description": lambda recs: _fasta(recs, header=lambda rid, d: f">{rid} caf\xe9 {d}").encode("latin-1"),
    "no description": lambda recs: _fasta(recs, header=lambda rid, d: f">{rid}").encode(),
    "utf-8 byte-order mark": lambda recs: b"\xef\xbb\xbf" + _fasta(recs).encode(),
    "gzip": lambda recs: gzip.compress(_fasta(recs).encode()),
    "all at once, gzipped": lambda recs: gzip.compress(
        _fasta(recs, sequence=lambda s: _wrapped(s.lower() + "*", 70), newline="\r\n").encode()),
}


@pytest.fixture(scope="module")
def clean_output(tmp_path_factory, tiny_model_path, fair_esm_tiny, records):
    """The clean, single-line form's output, checked against fair-esm's own forward."""
    folder = tmp_path_factory.mktemp("clean")
    (folder / "clean.fasta").write_text(_fasta(records))
    code, out = _run(folder, tiny_model_path, [folder / "clean.fasta"])
    assert code == 0
    ids, means, fingerprint, status = _embeddings(out)
    model, alphabet = fair_esm_tiny
    assert np.abs(means - fair_esm_means(model, alphabet, [seq for _, _, seq in records], [2])[2]).max() <= 1e-4
    assert ids == [rid for rid, _, _ in records] and status == "complete"
    return ids, means, fingerprint


@pytest.mark.parametrize("form", ACCEPTED)
def test_accepted_form_gives_the_clean_form_embeddings(tmp_path, tiny_model_path, records, clean_output, form):
    path = tmp_path / "input.fasta"
    path.write_bytes(ACCEPTED[form](records))
    code, out = _run(tmp_path, tiny_model_path, [path])
    assert code == 0
    ids, means, fingerprint, status = _embeddings(out)
    assert status == "complete"
    assert ids == clean_output[0]
    np.testing.assert_array_equal(means, clean_output[1])
    assert fingerprint == clean_output[2]  # the same inputs, as far as resuming is concerned


def _gzip_cut(text: str) -> bytes:
    data = gzip.compress(text.encode() * 20)
    return data[: len(data) // 2]


# name -> (file contents, the message after "PATH: ")
REFUSED = {
    "empty file": (b"", "the file is empty"),
    "only blank lines": (b"\n  \n\r\n", "the file is empty"),
    "record without sequence": (b">a one\nMKV\n>b two\n>c\nMKV\n", "record 2 (b): the record has no sequence"),
    "sequence of only a stop": (b">a\n*\n", "record 1 (a): the record has no sequence"),
    "header without id": (b">\nMKV\n", "record 1: the header has no id"),
    "digits and J": (b">a\nMKV\n>b\nMK1VJ\n", "record 2 (b): character(s) '1J' not in the ESM-2 protein alphabet"),
    "alignment gaps": (b">a\nMK-V.L\n", "record 1 (a): character(s) '-.' not in the ESM-2 protein alphabet"),
    "plain text": (b"hello\nworld\n", "not a FASTA file (the first line does not start with '>')"),
    "fastq": (b"@read1\nACGT\n+\nIIII\n", "not a FASTA file (the first line does not start with '>')"),
    "binary": (bytes(range(256)) * 4, "not a FASTA file (the first line does not start with '>')"),
    "truncated gzip": (_gzip_cut(">a\nMKVLA\n"), "the gzip stream is truncated or corrupt"),
}


def _assert_refused(capsys, code, out, message):
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"esm_features: error: {message}"), err
    assert "Traceback" not in err
    assert list(out.parent.iterdir()) == []  # no output, no lock, no partial file


@pytest.mark.parametrize("case", REFUSED)
def test_bad_input_is_refused_before_any_output(tmp_path, tiny_model_path, capsys, case):
    contents, problem = REFUSED[case]
    path = tmp_path / "input.fasta"
    path.write_bytes(contents)
    code, out = _run(tmp_path, tiny_model_path, [path])
    _assert_refused(capsys, code, out, f"{path}: {problem}")


def test_duplicate_id_within_a_file_names_both_records(tmp_path, tiny_model_path, capsys):
    path = tmp_path / "input.fasta"
    path.write_text(">a x\nMKV\n>b\nMVV\n>a y\nMKK\n")
    code, out = _run(tmp_path, tiny_model_path, [path])
    _assert_refused(capsys, code, out, f"{path}: record 3 (a): duplicate id, first seen at {path}: record 1 (a)")


def test_duplicate_id_across_real_files_names_both_locations(tmp_path, tiny_model_path, phage_dir, capsys):
    def numbered_ids(path):
        with open(path) as handle:
            return {title.split()[0]: n for n, (title, _) in enumerate(SimpleFastaParser(handle), 1)}

    first, second = phage_dir / "major_tail.fasta", phage_dir / "tail_fiber.fasta"
    in_first, in_second = numbered_ids(first), numbered_ids(second)
    (rid,) = in_first.keys() & in_second.keys()  # the one protein both files hold
    code, out = _run(tmp_path, tiny_model_path, [first, second])
    _assert_refused(capsys, code, out, f"{second}: record {in_second[rid]} ({rid}): duplicate id, "
                                       f"first seen at {first}: record {in_first[rid]} ({rid})")


def test_missing_fasta_is_refused(tmp_path, tiny_model_path, capsys):
    code, out = _run(tmp_path, tiny_model_path, [tmp_path / "nowhere.fasta"])
    _assert_refused(capsys, code, out, f"{tmp_path / 'nowhere.fasta'}: no such file")


@pytest.mark.parametrize("kind, problem", [("directory", "is a directory, not a FASTA file"),
                                           ("fifo", "not a regular file (a pipe or a device); save the FASTA to a "
                                                    "file first")])
def test_fasta_that_is_no_regular_file_is_refused(tmp_path, tiny_model_path, capsys, kind, problem):
    path = tmp_path / "input.fasta"
    path.mkdir() if kind == "directory" else os.mkfifo(path)
    code, out = _run(tmp_path, tiny_model_path, [path])
    _assert_refused(capsys, code, out, f"{path}: {problem}")


def test_the_same_fasta_twice_is_refused(tmp_path, tiny_model_path, capsys):
    path = tmp_path / "input.fasta"
    path.write_text(">a\nMKV\n")
    code, out = _run(tmp_path, tiny_model_path, [path, tmp_path / "." / "input.fasta"])
    _assert_refused(capsys, code, out, f"--fasta {tmp_path / '.' / 'input.fasta'}: names the same file as {path}; "
                                       f"give each input once")


@pytest.mark.parametrize("extra", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_an_output_naming_the_input_is_refused_and_the_input_kept(tmp_path, tiny_model_path, capsys, extra):
    path = tmp_path / "input.fasta"
    path.write_text(">a\nMKV\n")
    code = run_in_process(job_args(tiny_model_path, path, path, *extra))
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1] == (f"esm_features: error: {path}: is one of the --fasta "
                                                          f"inputs; choose another --out")
    assert path.read_text() == ">a\nMKV\n" and sorted(p.name for p in tmp_path.iterdir()) == ["input.fasta"]


def test_an_output_naming_a_directory_is_refused(tmp_path, tiny_model_path, capsys):
    fasta = tmp_path / "input.fasta"
    fasta.write_text(">a\nMKV\n")
    code = run_in_process(job_args(tiny_model_path, fasta, tmp_path))
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [f"esm_features: error: {tmp_path}: is a directory; name the "
                                                      f"output file"]


def test_output_in_a_missing_folder_is_refused_before_reading_input(tmp_path, tiny_model_path, capsys):
    out = tmp_path / "missing" / "out.h5"
    code = run_in_process(job_args(tiny_model_path, tmp_path / "nowhere.fasta", out))
    err = capsys.readouterr().err
    assert code == 2
    # The input is missing too, but the output is looked at first: a job that cannot write learns it at once.
    assert err.strip().splitlines()[-1] == (f"esm_features: error: {out}: cannot write in {out.parent} "
                                            f"(No such file or directory)")
    assert not out.parent.exists()


def test_a_dry_run_refuses_an_output_folder_that_is_missing_as_the_run_does(tmp_path, tiny_model_path, capsys):
    fasta, out = tmp_path / "input.fasta", tmp_path / "missing" / "out.h5"
    fasta.write_text(">a\nMKV\n")
    code = run_in_process(job_args(tiny_model_path, fasta, out, "--dry-run"))
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1] == (f"esm_features: error: {out}: cannot write in {out.parent} "
                                            f"(No such file or directory)")
