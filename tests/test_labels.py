import gzip

import pytest
from conftest import EXAMPLES, shared

from distill.labels import LabelError, expand, read_labelled


def test_astral_scope_file_gives_superfamilies_and_families():
    ds = read_labelled(str(shared("scope/astral-scopedom-40-2.07.shared85.fa")), "scope")
    assert len(ds) == 12175  # counts verified in ../shared/data/SOURCES.md
    assert len(set(ds.labels)) == 1892 and len(set(ds.groups)) == 4210
    i = ds.ids.index("d2gkma_")  # the first record: >d2gkma_ a.1.1.1 ... "gllsrlrkre..."
    assert (ds.labels[i], ds.groups[i]) == ("a.1.1", "a.1.1.1")
    assert ds.sequences[i].startswith("GLLSRLRKREPISIYDKIGG")


def test_pfam_family_directory_and_glob_read_all_54_families():
    ds = read_labelled(str(shared("pfam_families")), "pfam")
    assert len(ds) == 41807 and len(set(ds.labels)) == 54
    assert ds.counts()["PF00004"] == 176  # per-family count in SOURCES.md
    globbed = read_labelled(str(shared("pfam_families") / "PF0000*.fasta"), "pfam")
    assert set(globbed.labels) == {"PF00004", "PF00005"}


def test_stockholm_seeds_strip_gaps_and_uppercase():
    ds = read_labelled(str(shared("pfam_hmmer_seeds")), "pfam")
    assert len(ds) == 283 and len(set(ds.labels)) == 8  # version suffixes (PF00041.20) removed
    assert ds.counts()["PF00041"] == 98
    for seq in ds.sequences:
        assert "." not in seq and "-" not in seq and seq == seq.upper()
    # the first fn3 row, checked by hand against the file: gaps removed, insert columns upper-cased
    fn3 = shared("pfam_hmmer_seeds/PF00041.20_fn3.seed.sto").read_text().splitlines()
    name, aligned = next(line.split() for line in fn3 if line and not line.startswith("#"))
    assert ds.sequences[ds.ids.index(name)] == aligned.replace(".", "").replace("-", "").upper()


def test_tsv_and_gzip(tmp_path):
    tsv = tmp_path / "a.tsv"
    tsv.write_text("id\tlabel\tsequence\nx1\tPF00018\tMKVLA\nx2\tPF00397.29\tgsmkv\n")
    gz = tmp_path / "b.fa.gz"
    with gzip.open(gz, "wt") as f:
        f.write(">y1 PF00018\nMKT\nAY\n")
    ds = read_labelled([str(tsv), str(gz)], "pfam")
    assert ds.ids == ["x1", "x2", "y1"] and ds.labels == ["PF00018", "PF00397", "PF00018"]
    assert ds.sequences == ["MKVLA", "GSMKV", "MKTAY"]


@pytest.mark.parametrize(
    ("content", "task", "message"),
    [
        ("hello world\n", "pfam", "unknown label format"),
        (">d1 a.1\nMKV\n", "scope", "bad.txt:1 (record 'd1'): 'a.1' is not a SCOPe sccs"),
        (">x1\nMKV\n", "pfam", "bad.txt:1 (record 'x1'): no label in the header"),
        (">x1 PF00018\nMK1V\n", "pfam", "illegal residue '1'"),
        (">x1 PF00018\n>x2 PF00018\nMKV\n", "pfam", "'x1' (line 1) has an empty sequence"),
        ("x1\tPF00018\n", "pfam", "bad.txt:1: expected 3 tab-separated columns"),
        ("x1\tglobin\tMKV\n", "pfam", "bad.txt:1 (record 'x1'): 'globin' is not a Pfam accession"),
        ("x1\tPF00018\tmkßv\n", "pfam", "illegal residue 'ß' at position 3"),
        ("# STOCKHOLM 1.0\n#=GF AC PF00018.1\nx/1-3 MK.ﬃ\n//\n", "pfam", "illegal residue 'ﬃ' at position 3"),
        ("# STOCKHOLM 1.0\nx/1-3 MKV\n//\n", "pfam", "without a '#=GF AC' line"),
        ("# STOCKHOLM 1.0\n#=GF AC PF00018.1\nx/1-3 MK.V extra\n//\n", "pfam", "bad.txt:3: expected 'NAME aligned-sequence'"),
    ],
)
def test_bad_label_files_name_file_record_and_problem(tmp_path, content, task, message):
    bad = tmp_path / "bad.txt"
    bad.write_text(content)
    with pytest.raises(LabelError, match=None) as e:
        read_labelled(str(bad), task)
    assert message in str(e.value)


def test_duplicate_ids_across_files_missing_paths_and_unknown_task(tmp_path):
    (tmp_path / "a.fasta").write_text(">x PF00018\nMKV\n")
    (tmp_path / "b.fasta").write_text(">x PF00397\nMKV\n")
    with pytest.raises(LabelError, match="'x' also occurs in"):
        read_labelled(str(tmp_path), "pfam")
    with pytest.raises(LabelError, match="does not exist"):
        expand([str(tmp_path / "nope.fa")])
    with pytest.raises(LabelError, match="matches no files"):
        expand([str(tmp_path / "*.sto")])
    with pytest.raises(LabelError, match="unknown task 'go'"):
        read_labelled(str(EXAMPLES / "pfam.fasta"), "go")


def test_bundled_samples_parse():
    pfam = read_labelled(str(EXAMPLES / "pfam.fasta"), "pfam")
    scope = read_labelled(str(EXAMPLES / "scope.fasta"), "scope")
    assert (len(pfam), len(set(pfam.labels))) == (810, 54)
    assert (len(scope), len(set(scope.labels))) == (500, 20) and len(set(scope.groups)) >= 60


def test_separate_label_file_by_id_and_mismatches_named(tmp_path):
    fasta = tmp_path / "seqs.fa"
    fasta.write_text(">a some description\nMKV\n>b\nGSH\n")
    labels = tmp_path / "labels.tsv"
    labels.write_text("a\tPF00018\nb\tPF00397.2\n")
    ds = read_labelled(str(fasta), "pfam", labels)
    assert ds.labels == ["PF00018", "PF00397"] and ds.sequences == ["MKV", "GSH"]
    labels.write_text("a\tPF00018\n")
    with pytest.raises(LabelError, match=r"seqs.fa:3: record 'b' has no label in .*labels.tsv"):
        read_labelled(str(fasta), "pfam", labels)
    labels.write_text("a\tPF00018\nb\tPF00397\nc\tPF00041\n")
    with pytest.raises(LabelError, match=r"labels.tsv: 1 labelled ids have no sequence in .* \(first: 'c'\)"):
        read_labelled(str(fasta), "pfam", labels)
    labels.write_text("a\tPF00018\tx\n")
    with pytest.raises(LabelError, match=r"labels.tsv:1: expected 2 tab-separated columns"):
        read_labelled(str(fasta), "pfam", labels)
