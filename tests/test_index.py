"""distill index: build, append a new class, alignment re-ranking, model check, annotate --reference, bad input."""

from pathlib import Path

import numpy as np
import pytest
from conftest import pfam_examples, tiny_bundle, write_labelled
from typer.testing import CliRunner

from distill.cli.app import app
from distill.core.fasta import read_fasta
from distill.inference.index import IndexError_, ReferenceIndex, load_index
from distill.inference.kmers import KmerIndex, words

pytest.importorskip("faiss")
pytest.importorskip("pyopal")
runner = CliRunner()
OLD, NEW = ("PF00004", "PF00005", "PF00072"), "PF00076"


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("index")
    by = pfam_examples((*OLD, NEW))
    tiny_bundle(root / "tiny")
    tiny_bundle(root / "other", seed=1)
    return {
        "root": root,
        "old": write_labelled(root / "old.fasta", [r for f in OLD for r in by[f][:10]]),
        "new": write_labelled(root / "new.fasta", by[NEW][:10]),
        "queries": write_labelled(root / "q.fasta", [r for f in (*OLD, NEW) for r in by[f][10:15]]),
        "truth": {r.id: f for f in (*OLD, NEW) for r in by[f][10:15]},
    }


def build(refs: dict, out: Path, *extra: str, model: str = "tiny", data: str = "old") -> None:
    args = ["index", str(refs["root"] / model), "--data", str(refs[data]), "--task", "pfam", "-o", str(out), *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output


def annotate(refs: dict, index: Path, out: Path, model: str = "tiny") -> dict[str, dict[str, str]]:
    args = ["annotate", str(refs["queries"]), "-o", str(out), "--model", str(refs["root"] / model), "--reference", str(index), "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [line.split("\t") for line in out.read_text().splitlines()]
    return {row[0]: dict(zip(lines[0], row, strict=True)) for row in lines[1:]}


def test_an_appended_class_becomes_callable_without_retraining(refs, tmp_path):
    index = tmp_path / "idx"
    build(refs, index, "--align", "20")
    before = annotate(refs, index, tmp_path / "before.tsv")
    new_ids = [i for i, f in refs["truth"].items() if f == NEW]
    assert all(before[i]["ref_label_1"] != NEW for i in new_ids)  # not in the index yet
    build(refs, index, "--append", data="new")
    assert len(load_index(index)) == 40 and load_index(index).card["appended"] == 1
    after = annotate(refs, index, tmp_path / "after.tsv")
    assert sum(after[i]["ref_call"] == NEW for i in new_ids) >= 4, [after[i] for i in new_ids]
    # Calls are right and scored by the alignments' evidence, most significant (smallest E-value) first; cosine
    # similarities are reported beside them.
    right = np.mean([after[i]["ref_call"] == f for i, f in refs["truth"].items() if after[i]["ref_call"] != "-"])
    assert right >= 0.9 and all(float(r["ref_evalue_1"]) <= float(r["ref_evalue_2"]) for r in after.values())
    assert all(float(r["ref_call_score"]) >= -np.log(float(r["ref_evalue_1"])) - 1e-3 for r in after.values())
    again = runner.invoke(
        app, ["index", str(refs["root"] / "tiny"), "--data", str(refs["new"]), "--task", "pfam", "-o", str(index), "--append"]
    )
    assert again.exit_code == 2 and "10 ids are already in the index" in again.output


def test_alignment_reranking_orders_candidates_by_evalue_and_calls_by_vote(refs, tmp_path):
    import pyopal

    build(refs, tmp_path / "idx", "--align", "30", "--no-kmer")
    index = load_index(tmp_path / "idx")
    assert index.card["kmer"] == 0 and index.card["calibration"]["score"] == "alignment E-value"
    query = next(iter(read_fasta(refs["queries"]))).sequence
    nn = index.search(index.vectors[:1], 30, [query])
    cand = index.search(index.vectors[:1], 30)  # the 30 candidates by cosine
    targets = [index.sequences[index.ids.index(i)] for i in cand.ids[0]]
    direct = pyopal.align(query, targets, "BLOSUM62", gap_open=11, gap_extend=1)
    # -ln E = 0.267 S - ln(0.041 m n) - ln R over the R = 30 references of the index, by hand, best first
    assert len(index) == 30
    by_hand = sorted(
        (
            (0.267 * h.score - np.log(0.041 * len(query) * len(targets[h.target_index]) * 30), h.score, cand.ids[0][h.target_index])
            for h in direct
        ),
        key=lambda t: -t[0],
    )
    assert nn.evidence[0] == pytest.approx([e for e, _, _ in by_hand], rel=1e-5)
    assert list(nn.scores[0]) == [s for _, s, _ in by_hand] and nn.ids[0] == [i for _, _, i in by_hand]
    # the call: per label, best + 1/2 second + 1/4 third (positive ones); the label with the largest total on per-pair
    # evidence (+ ln 30), scored by its total on the index-wide evidence
    totals: dict[str, list[float]] = {}
    for e, label in zip(nn.evidence[0], nn.labels[0], strict=True):
        totals.setdefault(label, []).append(e)

    def vote(shift: float) -> dict[str, float]:
        return {
            lab: v[0] + shift + sum(w * max(x + shift, 0) for w, x in zip((0.5, 0.25), v[1:3], strict=False)) for lab, v in totals.items()
        }

    pair, index_wide = vote(np.log(30)), vote(0.0)
    assert nn.calls[0] == max(pair, key=pair.get) and nn.call_scores[0] == pytest.approx(index_wide[nn.calls[0]], rel=1e-5)


def test_evidence_and_vote_by_hand():
    from distill.inference.align import decide, evidence, vote

    # 0.267 * 100 - ln(0.041 * 100 * 200) = 26.7 - 6.7093
    assert evidence(np.array([100.0]), 100, np.array([200]))[0] == pytest.approx(19.9907, abs=1e-4)
    # searched against 1,000 references, E is 1,000 times larger: 19.9907 - ln 1000 = 13.0829 (E = 2.08e-6)
    assert evidence(np.array([100.0]), 100, np.array([200]), 1000)[0] == pytest.approx(13.0829, abs=1e-4)
    assert vote(["a", "b", "b"], np.array([10.0, 9.0, 8.0])) == ("b", 13.0)  # 9 + 8/2 beats one hit of 10
    assert vote(["a", "b", "b", "b", "b"], np.array([14.0, 8.0, 4.0, 4.0, 4.0])) == ("a", 14.0)  # 8 + 2 + 1; the 4th not counted
    assert vote(["a", "b", "b"], np.array([3.0, 2.0, -5.0])) == ("a", 3.0)  # a negative second hit costs nothing
    assert vote(["a", "b"], np.array([-1.0, -2.0])) == ("a", -1.0)  # weak calls stay ordered (below any threshold)
    # decide: b wins on per-pair evidence (+ ln 1000 = 6.908: a 9.908; b 8.908 + 5.908 / 2 = 11.862), scored on the
    # index-wide vote, where its second hit (-1: E > 1 over the index) adds nothing: 2.0
    label, score, totals = decide(["a", "b", "b"], np.array([3.0, 2.0, -1.0]), 1000)
    assert (label, score, totals) == ("b", 2.0, {"a": 3.0, "b": 2.0})


def test_calibration_leaves_whole_labels_out_for_real_out_of_set_negatives(refs, tmp_path):
    build(refs, tmp_path / "idx", "--align", "5")
    index = load_index(tmp_path / "idx")
    c = index.card["calibration"]
    assert c["n_negatives"] == 30 and c["n_outside"] == 30  # 30 shuffled; all 30 references searched with their label left out
    own = np.flatnonzero(np.array(index.labels) == index.labels[0])
    nn = index.search(index.vectors[:1], 25, [index.sequences[0]], exclude=[own])  # 25 = the 20 others + 5 more than exist
    assert len(nn.ids[0]) == 20 and index.labels[0] not in nn.labels[0] and nn.calls[0] != index.labels[0]
    alone = index.search(index.vectors[:1], 3, [index.sequences[0]], exclude=[np.array([0])])
    assert index.ids[0] not in alone.ids[0] and alone.calls[0] == index.labels[0]  # its own family, without itself


def test_an_index_calibrated_by_an_earlier_version_is_refused(refs, tmp_path):
    import json

    build(refs, tmp_path / "idx", "--align", "5")
    card_path = tmp_path / "idx" / "index.json"
    card = json.loads(card_path.read_text())
    for earlier in ("alignment", "alignment evidence"):  # raw scores; pairwise E-values
        card["calibration"]["score"] = earlier
        card_path.write_text(json.dumps(card))
        with pytest.raises(IndexError_, match="calibrated by an earlier version.*E-values over the whole index.*--align 5"):
            load_index(tmp_path / "idx")


def test_three_mer_words_and_their_nearest_references_by_hand():
    assert list(words("ACDX", 3)) == [0 * 400 + 1 * 20 + 2]  # A=0 C=1 D=2; the word with X matches nothing
    assert list(words("AAAA", 3)) == [0] and len(words("AC", 3)) == 0
    assert list(words("ACDEA")) == [0 * 8000 + 1 * 400 + 2 * 20 + 3, 1 * 8000 + 2 * 400 + 3 * 20 + 0]  # 4-mers by default
    refs = ["MKVLAAGW", "QQQQQQQQ", "MKVLTTTT"]
    kmers = KmerIndex(refs, 3)
    # MKV and KVL are in 2 of 3 references, VLA, LAA, ... in one: rarer words weigh more (idf = log(4 / (df + 1)))
    assert list(kmers.search(["MKVLAAGW"], 3)[0]) == [0, 2, 1]
    assert list(kmers.search(["MKVLAAGW"], 2, exclude=[np.array([0])])[0]) == [2, 1]


def test_kmer_candidates_find_a_homologue_the_embedding_does_not_rank_first(refs, tmp_path):
    """With --align 1 only one candidate per source is aligned: the 3-mer one is the query's own family."""
    records = list(read_fasta(refs["old"]))
    vectors = np.eye(len(records), 4, dtype=np.float32) + 0.01  # embedding: every reference far from the query but #0
    query = records[-1].sequence  # the 3-mer prefilter ranks reference -1 (the same sequence) first
    card = {"model": "x", "fingerprint": "x", "pooling": "mean", "dim": 4, "task": "pfam", "align": 1}
    with_kmers = ReferenceIndex(
        vectors, [r.id for r in records], [r.description for r in records], [r.sequence for r in records], card | {"kmer": 3}
    )
    without = ReferenceIndex(vectors, with_kmers.ids, with_kmers.labels, with_kmers.sequences, card | {"kmer": 0})
    q = np.array([[1, 0, 0, 0]], dtype=np.float32)
    assert without.search(q, 1, [query]).ids[0] == [records[0].id]
    assert with_kmers.search(q, 1, [query]).ids[0] == [records[-1].id]


def test_cosine_index_calibration_and_model_check(refs, tmp_path):
    build(refs, tmp_path / "idx")
    index = load_index(tmp_path / "idx")
    c = index.card["calibration"]
    assert c["score"] == "cosine" and 0 <= c["leave_one_out_accuracy"] <= 1 and c["n_negatives"] == 30
    assert index.card["check"]["sequences"] and index.card["pooling"] == "mean" and index.align == 0
    # Another model (same size, other weights) is refused, for annotate and for append.
    args = [
        "annotate",
        str(refs["queries"]),
        "-o",
        str(tmp_path / "x.tsv"),
        "--model",
        str(refs["root"] / "other"),
        "--reference",
        str(tmp_path / "idx"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "the index was built with" in result.output and "rebuild it" in result.output
    assert not (tmp_path / "x.tsv").exists()
    appended = runner.invoke(
        app, ["index", str(refs["root"] / "other"), "--data", str(refs["new"]), "--task", "pfam", "-o", str(tmp_path / "idx"), "--append"]
    )
    assert appended.exit_code == 2 and "embeds its reference sequences differently" in appended.output
    assert len(load_index(tmp_path / "idx")) == 30  # nothing written


def test_index_errors_are_clear(refs, tmp_path):
    with pytest.raises(IndexError_, match="not a reference index"):
        load_index(tmp_path)
    build(refs, tmp_path / "idx")
    (tmp_path / "idx" / "entries.tsv").write_text("a\tb\tMKV\n")
    with pytest.raises(IndexError_, match="corrupt: 30 vectors, 1 entries"):
        load_index(tmp_path / "idx")
    again = runner.invoke(
        app, ["index", str(refs["root"] / "tiny"), "--data", str(refs["old"]), "--task", "pfam", "-o", str(tmp_path / "idx")]
    )
    assert again.exit_code == 2 and "--append" in again.output
