import gzip

import pytest
from conftest import shared

from distill.core.fasta import DuplicateIdWarning, FastaError, count_records, iter_records, read_fasta


def test_multiline_lowercase_and_blank_lines(tmp_path):
    p = tmp_path / "a.fa"
    p.write_text(">seq1 first protein\nmkta\nyiak\n\n>seq2\nACDE\n")
    records = list(read_fasta(p))
    assert [(r.id, r.description, r.sequence, r.line) for r in records] == [
        ("seq1", "first protein", "MKTAYIAK", 1),
        ("seq2", "", "ACDE", 5),
    ]


def test_gzip_is_read_transparently(tmp_path):
    p = tmp_path / "a.fa.gz"
    with gzip.open(p, "wt") as f:
        f.write(">x\nMKV\nLL\n")
    assert [r.sequence for r in read_fasta(p)] == ["MKVLL"]


def test_illegal_residue_names_file_record_line_and_column(tmp_path):
    p = tmp_path / "bad.fa"
    p.write_text(">ok\nMKV\n>broken desc\nMKVL\nAAJA\n")
    with pytest.raises(FastaError) as e:
        list(read_fasta(p))
    msg = str(e.value)
    assert str(p) in msg and "'broken'" in msg and "line 5 column 3" in msg and "'J'" in msg and "residue 7" in msg


@pytest.mark.parametrize(
    "text, expected",
    [
        (">a\n>b\nMK\n", "record 'a' (line 1) has an empty sequence"),
        ("MKV\n>a\nMK\n", "line 1: sequence data with no '>' header"),
        (">\nMKV\n", "line 1: header '>' has no record id"),
        (">a\nMK-V\n", "illegal residue '-'"),
        (">a\nMK*\n", "illegal residue '*'"),
        # str.upper() would make these residues ("ß" -> "SS", "ı" -> "I"); only ASCII letters are folded
        (">a\nmkßt\n", "line 2 column 3: illegal residue 'ß'"),
        (">a\nMıK\n", "line 2 column 2: illegal residue 'ı'"),
    ],
)
def test_malformed_records_are_errors(tmp_path, text, expected):
    p = tmp_path / "bad.fa"
    p.write_text(text)
    with pytest.raises(FastaError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        list(read_fasta(p))


def test_iter_records_reports_every_bad_record_and_keeps_going(tmp_path):
    p = tmp_path / "mixed.fa"
    p.write_text("junk\nmore junk\n>a\nMK\n>b\n>c\nMJ\n>d\nMKV\n")
    records = list(iter_records(p))
    assert [r.id for r in records] == ["<no header, line 1>", "a", "b", "c", "d"]
    assert [r.error is None for r in records] == [False, True, False, False, True]


def test_duplicate_ids_warn(tmp_path):
    p = tmp_path / "dup.fa"
    p.write_text(">a\nMK\n>a\nMV\n")
    with pytest.warns(DuplicateIdWarning, match="duplicate record id 'a' \\(line 3\\)"):
        assert len(list(read_fasta(p))) == 2


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(read_fasta("/nonexistent/x.fa"))


def test_real_scope_file_parses_completely():
    path = shared("scope/astral-scopedom-40-2.07.shared85.fa")
    records = list(read_fasta(path))
    assert len(records) == count_records(path) == 12175  # SOURCES.md: 12,175 domains
    assert all(r.sequence.isupper() for r in records)
    assert records[0].description.split()[0].count(".") == 3  # sccs follows the id
