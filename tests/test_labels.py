import gzip

import pytest
from conftest import EXAMPLES, shared

from distill.core.labels import LabelError, LabelRule, expand, read_labelled


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


def test_duplicate_ids_across_files_missing_paths_and_bad_task_names(tmp_path):
    (tmp_path / "a.fasta").write_text(">x PF00018\nMKV\n")
    (tmp_path / "b.fasta").write_text(">x PF00397\nMKV\n")
    with pytest.raises(LabelError, match="'x' also occurs in"):
        read_labelled(str(tmp_path), "pfam")
    with pytest.raises(LabelError, match="does not exist"):
        expand([str(tmp_path / "nope.fa")])
    with pytest.raises(LabelError, match="matches no files"):
        expand([str(tmp_path / "*.sto")])
    for bad in ("go term", "1abc", "ec-number", "", "x" * 41):
        with pytest.raises(LabelError, match="is not usable: it names the head, the ONNX output"):
            read_labelled(str(EXAMPLES / "pfam.fasta"), bad)


def test_free_tasks_keep_labels_as_written_from_tsv_headers_fields_and_regexes(tmp_path):
    tsv = tmp_path / "loc.tsv"
    tsv.write_text("id\tlabel\tsequence\nP1\tCytoplasm\tMKV\nP2\t3.2.1.4\tmkt\nP3\tPF00041.20\tGG\n")
    ds = read_labelled(str(tsv), "localisation")
    assert ds.labels == ["Cytoplasm", "3.2.1.4", "PF00041.20"] and ds.sequences[1] == "MKT"  # unchanged: no preset parsing
    fasta = tmp_path / "ec.fa"
    fasta.write_text(">a sp|X ec=3.2.1.4 len=3\nMKV\n>b sp|Y ec=1.1.1.1 len=2\nMK\n")
    assert read_labelled(str(fasta), LabelRule("ec", field=2)).labels == ["ec=3.2.1.4", "ec=1.1.1.1"]
    assert read_labelled(str(fasta), LabelRule("ec", regex=r"ec=(\S+)")).labels == ["3.2.1.4", "1.1.1.1"]
    with pytest.raises(LabelError, match=r"ec.fa:1 \(record 'a'\): no label in the header; expected '>ID LABEL ...' \(field 5"):
        read_labelled(str(fasta), LabelRule("ec", field=5))
    with pytest.raises(LabelError, match="finds no label in the header"):
        read_labelled(str(fasta), LabelRule("ec", regex=r"go=(\S+)"))
    with pytest.raises(LabelError, match=r"needs a \(group\)"):
        LabelRule("ec", regex=r"ec=\S+")
    (tmp_path / "dash.tsv").write_text("P1\t-\tMKV\n")
    with pytest.raises(LabelError, match="'-' \\(the no-call mark\\)"):
        read_labelled(str(tmp_path / "dash.tsv"), "loc")


def test_scope_levels_cut_the_sccs():
    want = {"class": "a", "fold": "a.26", "superfamily": "a.26.1", "family": "a.26.1.2"}  # d3tgxb_ a.26.1.2, the first record
    for level, label in want.items():
        ds = read_labelled(str(EXAMPLES / "scope.fasta"), LabelRule("scope", level=level))
        assert (ds.ids[0], ds.labels[0], ds.groups[0]) == ("d3tgxb_", label, "a.26.1.2")
        assert all(x.count(".") == label.count(".") for x in ds.labels), level
    with pytest.raises(LabelError, match="--level must be one of class, fold, superfamily, family"):
        LabelRule("scope", level="domain")


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
