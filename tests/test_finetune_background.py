"""distill finetune --background: training windows between real flanks, the background's member rule and halves,
a head that scans whole proteins (annotate's domain table; over ONNX Runtime and the service: test_service.py)."""

import csv

import numpy as np
import pytest
from conftest import EXAMPLES, write_labelled
from typer.testing import CliRunner

from distill.cli.app import app
from distill.core.bundle import save_bundle
from distill.core.config import FinetuneConfig, ModelConfig
from distill.core.fasta import read_fasta
from distill.core.heads import heads_of
from distill.core.model import build_student
from distill.recipes.finetune import finetune
from distill.recipes.finetune_data import in_window, step_examples

pytest.importorskip("pyopal")  # the member rule aligns
runner = CliRunner()
FAMILIES = ("PF00004", "PF00005", "PF00072", "PF00076")
TINY = ModelConfig(layers=2, dim=32, heads=2, ffn=64)


def test_a_piece_is_cut_to_a_window_or_put_between_flanks_of_one_background_protein():
    rng = np.random.default_rng(0)
    protein = np.arange(100, 400)  # token values that say where they came from
    short = in_window(np.arange(10), [protein], rng, window=16)
    inside = np.flatnonzero(short < 10)
    assert len(short) == 16 and short[inside].tolist() == list(range(10)) and np.all(np.diff(inside) == 1)
    flank = np.r_[short[: inside[0]], short[inside[-1] + 1 :]]
    assert len(flank) == 6 and np.all(np.diff(flank) == 1)  # one contiguous stretch of the protein, split around the piece
    long = in_window(np.arange(40), [protein], rng, window=16)
    assert len(long) == 16 and np.all(np.diff(long) == 1) and long[0] <= 24


def test_a_step_gains_background_negatives_as_long_as_its_crops():
    seqs = [np.full(n, 5) for n in (30, 50, 70, 90)]
    cfg = FinetuneConfig("m", [], "pfam", "o", negative_rate=0.5, background_rate=0.5, context_rate=0.0)
    crops, y, rows = step_examples(seqs, np.arange(4), np.arange(4), 0, cfg, [np.full(500, 7)])
    assert y.tolist() == [0, 1, 2, 3, -1, -1, -1, -1] and len(rows) == 8
    assert [len(c) for c in crops] == [30, 50, 70, 90, 30, 50, 30, 50]
    assert all((c == 7).all() for c in crops[6:]) and all((c == 5).all() for c in crops[4:6])  # shuffles, then background
    plain = step_examples(seqs, np.arange(4), np.arange(4), 0, cfg)[1]
    assert plain.tolist() == [0, 1, 2, 3, -1, -1]


@pytest.fixture(scope="module")
def scanning(tmp_path_factory) -> dict:
    """A tiny model fine-tuned on 4 families with a background of proteins made of other families' domains, one of
    which carries a training domain of PF00004 (a member the rule must recognise)."""
    root = tmp_path_factory.mktemp("bg")
    records = list(read_fasta(EXAMPLES / "pfam.fasta"))
    train = [r for fam in FAMILIES for r in [x for x in records if x.description == fam][:10]]
    others = [r.sequence for r in records if r.description not in FAMILIES][:60]
    proteins = ["".join(others[i : i + 3]) for i in range(0, 60, 3)]
    proteins[0] = proteins[0][:80] + train[0].sequence + proteins[0][80:]  # PF00004 inside: presumed member
    background = root / "background.fasta"
    background.write_text("".join(f">bg{i}\n{p}\n" for i, p in enumerate(proteins)))
    save_bundle(root / "tiny", build_student(TINY, seed=0), None)
    data = write_labelled(root / "train.fasta", train)
    cfg = FinetuneConfig(str(root / "tiny"), [str(data)], "pfam", str(root / "run"), epochs=1, batch_size=8, lr=3e-3,
                         valid_fraction=0.2, quiet=True, background=str(background))  # fmt: skip
    return {"root": root, "bundle": finetune(cfg).bundle, "proteins": proteins}


def test_the_card_says_the_head_scans_and_what_the_background_held(scanning):
    c = heads_of(scanning["bundle"])["pfam"].card["calibration"]
    b = c["background"]
    assert c["scan"] == {"window": 96, "stride": 32} and b["name"] == "background.fasta"
    half = np.random.default_rng([0, 13]).permutation(20) % 2 == 1  # the halves are keyed by the seed
    assert b["presumed_members"] >= 1 and b["proteins"] == half.sum()  # the planted PF00004 protein at least
    assert (~half).sum() - b["presumed_members"] <= b["training_negatives"] <= (~half).sum()
    assert all(c["threshold"] <= t for t in c["labels"].values())


def test_annotate_writes_each_labels_best_window_and_the_heads_domains(scanning, tmp_path):
    from distill.inference import resolve
    from distill.inference.scan import scan, segment

    fasta = tmp_path / "q.fasta"
    fasta.write_text("".join(f">p{i}\n{p}\n" for i, p in enumerate(scanning["proteins"][:4])))
    out = tmp_path / "a.tsv"
    res = runner.invoke(
        app, ["annotate", str(fasta), "-o", str(out), "--model", str(scanning["bundle"]), "--quiet", "--min-probability", "0"]
    )
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open(), delimiter="\t"))
    e = resolve(str(scanning["bundle"]), providers="cpu")
    scans = scan(e, scanning["proteins"][:4], "pfam", 96, 32)
    for row, s in zip(rows, scans, strict=True):
        assert float(row["pfam_prob_1"]) == pytest.approx(s.best.max(), abs=1e-4)
    domains = list(csv.DictReader((tmp_path / "a.domains.tsv").open(), delimiter="\t"))
    expected = [(f"p{i}", d.start, d.end, d.label) for i, s in enumerate(scans) for d in segment(s, e.labels["pfam"], lambda label: 0.0)]
    assert [(d["id"], int(d["start"]), int(d["end"]), d["label"]) for d in domains] == expected and expected
    assert {d["source"] for d in domains} == {"pfam"} and {d["evalue"] for d in domains} == {""}


def test_a_background_of_one_protein_is_refused_by_name(tmp_path):
    records = list(read_fasta(EXAMPLES / "pfam.fasta"))
    data = write_labelled(tmp_path / "d.fasta", [r for fam in FAMILIES for r in [x for x in records if x.description == fam][:10]])
    (tmp_path / "one.fasta").write_text(">p\nMKTAYIAKQRQISFVKSHFSRQ\n")
    res = runner.invoke(app, ["finetune", "random:small", "--data", str(data), "--task", "pfam", "--out", str(tmp_path / "r"),
                              "--background", str(tmp_path / "one.fasta")])  # fmt: skip
    assert res.exit_code == 2 and "one.fasta holds 1 protein: it needs two or more" in res.output, res.output
    assert not (tmp_path / "r").exists()
