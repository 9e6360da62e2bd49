"""Proteome calls: domains with coordinates, per-label thresholds from a background proteome, the related verdict."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import pfam_examples, tiny_bundle, write_labelled
from typer.testing import CliRunner

from distill.cli.app import app
from distill.core.fasta import Record
from distill.inference.domains import overlap, segment
from distill.inference.index import ReferenceIndex, load_index

pytest.importorskip("faiss")
pytest.importorskip("pyopal")
runner = CliRunner()
IN, OUT = ("PF00004", "PF00005", "PF00072"), "PF00076"


def test_overlap_and_regions_by_hand():
    assert overlap((10, 100), (15, 95)) == 1.0  # the shorter lies inside
    assert overlap((10, 100), (60, 200)) == pytest.approx(41 / 91)  # 60-100 shared, of the shorter's 91
    assert overlap((1, 5), (6, 9)) == 0.0
    spans = np.array([[10, 100, 1, 90], [15, 95, 3, 80], [150, 230, 2, 81], [60, 200, 1, 140]])
    labels, evidence = ["a", "a", "b", "c"], np.array([20.0, 15.0, 12.0, 11.0])
    # hit 4 (60-200) overlaps region 1 by 41/91 < 0.5 and region 2 (150-230) by 51/81: it joins region 2
    d1, d2 = segment(spans, labels, evidence, np.array([7, 8, 9, 10]), 1)  # 1 reference: per-pair and index-wide agree
    assert (d1.start, d1.end, d1.label, d1.score, d1.ref, d1.ref_start, d1.ref_end) == (10, 100, "a", 20 + 15 / 2, 7, 1, 90)
    assert d1.evalue == pytest.approx(np.exp(-20.0))
    assert (d2.start, d2.end, d2.label, d2.score, d2.ref) == (150, 230, "b", 12.0, 9)  # b 12 outvotes c 11


def test_background_thresholds_by_hand():
    from distill.inference.index_calibration import MARGIN, calibrate_labels

    votes = [{"a": 2.0, "b": 1.0}, {"a": 5.0}, {"a": 25.0}, {"d": 10.0}, {"c": 2.5}, {}]
    index = SimpleNamespace(threshold=3.0, labels=["a", "b", "c", "d", "e"], search=lambda v, k, s: SimpleNamespace(votes=votes))
    got = calibrate_labels(index, "bg.fasta", np.zeros((6, 2)), ["M"] * 6)
    # a: 25 >= -ln 1e-5 = 11.51 is a presumed member; its best non-member 5 + ln 10 = 7.30. b: 1 + ln 10 = 3.30 > 3.
    # c: 2.5 + 2.30 = 4.80. d: 10 + 2.30 = 12.30, capped at 11.51 (E 1e-5 is always a call). e: no hit, stays global.
    assert MARGIN == pytest.approx(np.log(10))
    assert got["labels"] == pytest.approx({"a": 5 + np.log(10), "b": 1 + np.log(10), "c": 2.5 + np.log(10), "d": -np.log(1e-5)})
    assert got["background"] | {"margin": 0} == {"name": "bg.fasta", "proteins": 6, "raised": 4, "presumed_members": 1,
                                                   "margin": 0, "member_evalue": 1e-5}  # fmt: skip
    card = {"calibration": {"threshold": 3.0, **got}}
    idx = ReferenceIndex(np.eye(2, dtype=np.float32), ["r1", "r2"], ["a", "b"], ["MK", "MV"], card)
    assert [idx.verdict("a", s) for s in (2.0, 5.0, 7.4)] == ["no-call", "related", "call"]
    assert idx.verdict("e", 3.5) == "call" and idx.threshold_for("e") == 3.0


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """An index of 3 families; queries of those and of a 4th family; the 4th family's others as a background."""
    root = tmp_path_factory.mktemp("domains")
    by = pfam_examples((*IN, OUT))
    tiny_bundle(root / "tiny")
    fused = [Record(f"{a.id}+{b.id}", "", a.sequence + b.sequence, 0) for a, b in zip(by[IN[0]][10:12], by[IN[2]][10:12], strict=True)]
    queries = [r for f in IN for r in by[f][10:13]] + by[OUT][:3] + fused
    return {
        "root": root,
        "refs": write_labelled(root / "refs.fasta", [r for f in IN for r in by[f][:10]]),
        "queries": write_labelled(root / "q.fasta", queries),
        "background": write_labelled(root / "bg.fasta", by[OUT][3:]),
        "fused": {r.id: (len(by[IN[0]][10 + i].sequence), len(r.sequence)) for i, r in enumerate(fused)},
    }


def run(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def rows(path: Path) -> list[dict[str, str]]:
    lines = [line.split("\t") for line in path.read_text().splitlines()]
    return [dict(zip(lines[0], row, strict=True)) for row in lines[1:]]


def test_background_index_writes_a_domain_table_and_two_domains_of_a_fused_protein(world, tmp_path):
    index = tmp_path / "idx"
    out = run("index", str(world["root"] / "tiny"), "--data", str(world["refs"]), "--task", "pfam", "--align", "20",
              "--background", str(world["background"]), "-o", str(index))  # fmt: skip
    assert "background bg.fasta: 12 proteins" in out
    card = load_index(index).card["calibration"]
    assert card["background"]["proteins"] == 12 and set(card["labels"]) <= set(IN)
    assert all(t >= card["threshold"] for t in card["labels"].values())
    calls = tmp_path / "calls.tsv"
    run("annotate", str(world["queries"]), "--model", str(world["root"] / "tiny"), "--reference", str(index), "-o", str(calls), "--quiet")
    table, domains = rows(calls), rows(tmp_path / "calls.domains.tsv")
    assert {"ref_call_evalue", "ref_related_to"} <= set(table[0])
    assert all(d["verdict"] in ("call", "related") and 1 <= int(d["start"]) <= int(d["end"]) for d in domains)
    by_id = {r["id"]: r for r in table}
    for d in domains:  # every region lies inside its protein
        assert int(d["end"]) <= int(by_id[d["id"]]["length"])
    for rid, (cut, length) in world["fused"].items():  # a PF00004 domain then a PF00072 one: both found, in order
        mine = [d for d in domains if d["id"] == rid and d["verdict"] == "call"]
        assert [d["label"] for d in mine] == [IN[0], IN[2]], mine
        assert int(mine[0]["end"]) <= cut + 10 and cut - 10 <= int(mine[1]["start"]) <= int(mine[1]["end"]) <= length
    # sharded runs and `distill merge` give the same domain table as one run
    for i in range(2):
        run("annotate", str(world["queries"]), "--model", str(world["root"] / "tiny"), "--reference", str(index),
            "-o", str(tmp_path / f"s{i}.tsv"), "--quiet", "--shard", f"{i}/2", "--chunk-records", "4")  # fmt: skip
    run("merge", str(tmp_path / "s1.tsv"), str(tmp_path / "s0.tsv"), "-o", str(tmp_path / "m.tsv"))
    assert (tmp_path / "m.domains.tsv").read_bytes() == (tmp_path / "calls.domains.tsv").read_bytes()


def test_background_errors_are_clear(world, tmp_path):
    base = ["index", str(world["root"] / "tiny"), "--data", str(world["refs"]), "--task", "pfam", "-o", str(tmp_path / "idx")]
    no_align = runner.invoke(app, [*base, "--background", str(world["background"])])
    assert no_align.exit_code == 2 and "--background calibrates alignment calls per label: add --align N" in no_align.output
    bad = tmp_path / "bad.fasta"
    bad.write_text(">p1\nMKV\n>p2\nMK1V\n")
    res = runner.invoke(app, [*base, "--align", "5", "--background", str(bad)])
    assert res.exit_code == 2 and "p2" in res.output and "line 4 column 3" in res.output, res.output
    missing = runner.invoke(app, [*base, "--align", "5", "--background", str(tmp_path / "nope.fasta")])
    assert missing.exit_code == 2 and "nope.fasta does not exist" in missing.output
    run(*base, "--align", "5", "--background", str(world["background"]))
    res = runner.invoke(app, [*base, "--append", "--data", str(world["background"])])
    assert res.exit_code == 2 and "calibrated against the background proteome bg.fasta: pass --background again" in res.output


def test_an_aligning_index_calls_nothing_weaker_than_its_max_evalue(world, tmp_path):
    base = ["index", str(world["root"] / "tiny"), "--data", str(world["refs"]), "--task", "pfam", "--align", "5"]
    run(*base, "-o", str(tmp_path / "strict"), "--max-evalue", "1e-3")
    run(*base, "-o", str(tmp_path / "loose"), "--max-evalue", "1000")
    strict, loose = (load_index(tmp_path / n).card["calibration"] for n in ("strict", "loose"))
    assert strict["target_threshold"] == loose["target_threshold"]  # the precision calibration is the same
    assert strict["threshold"] == pytest.approx(max(strict["target_threshold"], np.log(1e3)))
    assert loose["threshold"] == pytest.approx(max(loose["target_threshold"], np.log(1e-3)))
    bad = runner.invoke(app, [*base, "-o", str(tmp_path / "bad"), "--max-evalue", "0"])
    assert bad.exit_code == 2 and "--max-evalue must be in (0, 1000], got 0.0" in bad.output


def test_a_killed_run_resumes_both_tables_to_the_same_bytes(world, tmp_path):
    import json

    index = tmp_path / "idx"
    run("index", str(world["root"] / "tiny"), "--data", str(world["refs"]), "--task", "pfam", "--align", "20", "-o", str(index))
    out = tmp_path / "calls.tsv"
    base = ["annotate", str(world["queries"]), "--model", str(world["root"] / "tiny"), "--reference", str(index), "-o", str(out),
            "--quiet", "--chunk-records", "4"]  # fmt: skip
    run(*base)
    whole, domains = out.read_bytes(), (tmp_path / "calls.domains.tsv").read_bytes()
    # the state a kill after the first chunk leaves: progress says 4 records; both files hold more (a half-written chunk)
    first = [line.split(b"\t")[0] for line in whole.splitlines()[1:5]]
    dom_lines = domains.splitlines(keepends=True)
    kept = dom_lines[0] + b"".join(line for line in dom_lines[1:] if line.split(b"\t")[0] in first)
    progress = out.with_name(out.name + ".progress.json")
    state = json.loads(progress.read_text())
    state |= {"complete": False, "records": 4, "ok": 4, "errors": 0, "chunks": 1, "residues": 0,
              "bytes": len(b"".join(whole.splitlines(keepends=True)[:5])), "domain_bytes": len(kept)}  # fmt: skip
    progress.write_text(json.dumps(state))
    (tmp_path / "calls.domains.tsv").write_bytes(domains + b"half a row")
    run(*base, "--resume")
    assert out.read_bytes() == whole and (tmp_path / "calls.domains.tsv").read_bytes() == domains
