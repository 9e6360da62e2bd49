"""Calls from a few dozen examples: LP-FT's start and fall-back, k-fold calibration, the confidence rule, the refusal."""

import numpy as np
import pytest
from conftest import EXAMPLES, write_labelled
from safetensors.torch import load_file
from typer.testing import CliRunner

from distill.cli.app import app
from distill.core.bundle import save_bundle
from distill.core.calibration import NEVER, binomial_interval, calibrate, fold_of, refusal, threshold_for_precision
from distill.core.config import FinetuneConfig, ModelConfig
from distill.core.fasta import read_fasta
from distill.core.labels import LabelledSet
from distill.core.model import build_student
from distill.recipes.finetune_data import Data
from distill.recipes.finetune_fallback import kept_note, oof_f1, probe_kept
from distill.recipes.finetune_folds import out_of_fold

FAMILIES = ("PF00004", "PF00005", "PF00072")


@pytest.fixture(scope="module")
def pfam3(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pfam3")
    records = [r for r in read_fasta(EXAMPLES / "pfam.fasta") if r.description in FAMILIES]
    save_bundle(root / "tiny", build_student(ModelConfig(layers=2, dim=32, heads=2, ffn=64), seed=0), None)
    return {"root": root, "train": write_labelled(root / "train.fasta", records), "tiny": root / "tiny"}


def test_the_confidence_rule_asks_for_as_many_right_calls_as_the_bound_needs_by_hand():
    # 0.99 at 90% confidence: 230 right calls in a row pass (bound 0.99004), 229 do not (0.98995)
    for right, reached in ((230, True), (229, False)):
        scores = np.r_[np.linspace(1.0, 0.9, right), 0.5]
        correct = np.r_[np.ones(right, bool), False]
        th = threshold_for_precision(scores, correct, 0.99, right, confidence=0.9)
        assert th.reached is reached
        assert th.precision_lower == pytest.approx(0.1 ** (1 / right))  # Clopper-Pearson with no error: alpha^(1/n)
    point = threshold_for_precision(np.r_[np.linspace(1.0, 0.9, 20), 0.5], np.r_[np.ones(20, bool), False], 0.99, 20)
    assert point.reached and point.coverage == 1.0 and point.calls == 20  # the point rule calls all 20 (precision 1.0)
    low, high = binomial_interval(5, 10)
    assert low == pytest.approx(0.187086, abs=1e-5) and high == pytest.approx(0.812914, abs=1e-5)  # textbook CP values
    assert binomial_interval(0, 10)[0] == 0.0 and binomial_interval(10, 10)[1] == 1.0


def test_a_head_that_cannot_reach_the_target_says_by_how_much_and_what_would_help():
    logits = np.eye(3)[np.arange(30) % 3] * 5.0  # 30 right calls, confident
    c = calibrate(logits, np.arange(30) % 3, np.zeros((4, 3)), 0.99, fit=False, confidence=0.9)
    assert not c["reached"] and c["precision_lower"] == pytest.approx(0.1 ** (1 / 30)) and c["threshold"] == NEVER  # no calls
    message = refusal(c | {"pool": "out-of-fold (5 folds)"})
    assert "no threshold reaches precision 0.99 on 30 out-of-fold (5 folds) sequences + 4 negatives at 90% confidence" in message
    assert "best lower bound 0.926" in message and "needs 230 calls without an error" in message and "--confidence" in message


def test_folds_are_stratified_and_every_sequence_is_scored_by_a_model_that_never_saw_it(tmp_path):
    y = np.repeat([0, 1, 2], 10)
    which = fold_of(y, 5, seed=0)
    assert all(np.bincount(y[which == k], minlength=3).tolist() == [2, 2, 2] for k in range(5))
    seqs = [f"{'ACDEFGHIKL'[i % 10]}{'MNPQRSTVWY'[i // 10]}KKK" for i in range(30)]  # 30 distinct sequences
    ds = LabelledSet([f"s{i}" for i in range(30)], seqs, [str(v) for v in y], [str(v) for v in y], [""] * 30)
    d = Data(ds.subset(range(24)), ds.subset(range(24, 30)), ["0", "1", "2"], y[:24], y[24:], ["WWWWW"], None, [])
    calls = []

    def train_fold(cfg, fd):  # a "model" that scores a sequence by its index; it records what it trained on
        (tmp_path / "o" / "folds" / str(len(calls))).mkdir(parents=True)
        calls.append(set(fd.train.sequences) | set(fd.valid.sequences))
        index = lambda batch: np.array([[float(seqs.index(s)) if s in seqs else -1.0, 0, 0] for s in batch])  # noqa: E731
        return {"probe": lambda batch: -index(batch), "tuned": index}

    cfg = FinetuneConfig("m", ["x"], "pfam", str(tmp_path / "o"), valid_fraction=0.2, seed=0)
    both = out_of_fold(cfg, d, 5, train_fold)
    assert set(both) == {"probe", "tuned"} and both["probe"]["logits"][:, 0].tolist() == [-i for i in range(30)]
    oof = both["tuned"]
    assert len(calls) == 5 and oof["logits"][:, 0].tolist() == list(range(30))  # every sequence once, in input order
    assert oof["y"].tolist() == y.tolist() and len(oof["negative_logits"]) == 30 + 1  # shuffled copies + the out-of-set one
    for k, seen in enumerate(calls):
        held = {seqs[i] for i in np.flatnonzero(which == k)}
        assert not held & seen and len(seen) == 24  # the fold's model trained on the other 24, never on its own 6
    assert out_of_fold(cfg, d, 5, lambda *a: pytest.fail("a finished fold is not redone"))["tuned"]["logits"].shape == (30, 3)
    with pytest.raises(ValueError, match="--folds must be 0"):
        out_of_fold(cfg, d, 31, train_fold)


def test_out_of_fold_macro_f1_decides_between_probe_and_fine_tune_by_hand():
    y = np.array([0, 0, 1, 1])
    right, one_wrong = np.eye(2)[[0, 0, 1, 1]], np.eye(2)[[0, 1, 1, 1]]
    f1 = oof_f1({"probe": {"logits": one_wrong, "y": y}, "tuned": {"logits": right, "y": y}})
    # one class-0 member called 1: class 0 precision 1 recall 1/2 (F1 2/3), class 1 precision 2/3 recall 1 (F1 4/5)
    assert f1["probe"] == pytest.approx((2 / 3 + 4 / 5) / 2) and f1["tuned"] == 1.0
    valid_says_probe = {"best_f1": 0.5, "probe_f1": 0.9}
    assert probe_kept(valid_says_probe) and not probe_kept(valid_says_probe | {"oof_f1": f1})  # out of fold overrules
    assert probe_kept({"best_f1": 0.9, "probe_f1": 0.5, "oof_f1": {"probe": 0.7, "tuned": 0.7}})  # a tie keeps the probe
    assert "over 810 labelled sequences" in kept_note({"oof_f1": {"probe": 0.7, "tuned": 0.6}}, 810)


def test_a_fine_tune_that_loses_out_of_fold_keeps_a_probe_fitted_on_every_labelled_sequence(pfam3, tmp_path):
    import json

    n = sum(1 for _ in read_fasta(pfam3["train"]))
    args = ["finetune", str(pfam3["tiny"]), "--data", str(pfam3["train"]), "--task", "pfam", "--epochs", "1", "--batch-size", "8",
            "--valid-fraction", "0.2", "--lr", "1e-9", "--folds", "2", "--out", str(tmp_path / "run")]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "did not beat the linear probe out of fold" in res.output and f"over {n} labelled sequences" in res.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["oof_f1"]["tuned"] <= metrics["oof_f1"]["probe"]
    card = json.loads((tmp_path / "run" / "model" / "heads" / "pfam" / "labels.json").read_text())
    assert card["kept"] == "probe" and card["metrics"]["scored_on"] == "out-of-fold (2 folds)" and card["metrics"]["n_valid"] == n
    assert card["metrics"]["f1_macro"] == pytest.approx(metrics["oof_f1"]["probe"])  # the card reports the kept kind's scores
    # the bundle's head is not the run's probe (fitted on the training part) but the head `distill probe` fits on all n
    res = CliRunner().invoke(app, ["probe", str(pfam3["tiny"]), "--data", str(pfam3["train"]), "--test", str(pfam3["train"]),
                                   "--task", "pfam", "--seed", "0", "--out", str(tmp_path / "probe")])  # fmt: skip
    assert res.exit_code == 0, res.output
    run_probe = load_file(str(tmp_path / "run" / "probe" / "head.safetensors"))
    kept = load_file(str(tmp_path / "run" / "model" / "heads" / "pfam" / "head.safetensors"))
    probed = load_file(str(next((tmp_path / "probe").rglob("head.safetensors"))))
    assert not np.allclose(run_probe["mean"].numpy(), kept["mean"].numpy())
    assert set(kept) == set(probed) and {"mean", "scale"} < set(kept)
    for name in set(kept) - {"temperature"}:  # the temperature is each one's own calibration
        np.testing.assert_allclose(kept[name].numpy(), probed[name].numpy(), rtol=1e-5, atol=1e-6)


def test_a_fine_tune_that_never_beats_the_probe_keeps_it_and_lp_ft_starts_from_it(pfam3, tmp_path):
    import json

    args = ["finetune", str(pfam3["tiny"]), "--data", str(pfam3["train"]), "--task", "pfam", "--epochs", "3", "--batch-size", "8",
            "--valid-fraction", "0.2", "--lr", "1e-9", "--folds", "0", "--patience", "1"]  # fmt: skip
    rows = {}
    for mode in ("--no-lp-ft", "--lp-ft"):
        res = CliRunner().invoke(app, [*args, mode, "--out", str(tmp_path / mode)])
        assert res.exit_code == 0, res.output
        assert "linear probe on the frozen encoder" in res.output and "did not beat the linear probe" in res.output
        assert "the linear probe's head, kept" in res.output
        rows[mode] = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        parent, kept = (load_file(str(p / "model.safetensors")) for p in (pfam3["tiny"], tmp_path / mode / "model"))
        assert all((parent[k] == kept[k]).all() for k in parent)  # the encoder is the parent's, unchanged
        card = json.loads((tmp_path / mode / "model" / "heads" / "pfam" / "labels.json").read_text())
        assert card["kept"] == "probe" and card["calibration"]["confidence"] == 0.9
    plain, lpft = rows["--no-lp-ft"], rows["--lp-ft"]
    # patience counts against the fine-tune's own best, not the probe's: epoch 1 is its first best, epoch 2 the stop
    assert [r["epoch"] for r in plain] == [0, 1, 2]
    assert plain[0]["epoch"] == 0 and plain[0]["train_loss"] is None  # the probe: `distill probe`'s linear head; LP-FT's is cosine
    # at lr 1e-9 nothing moves: LP-FT's epochs score as its starting probe, a fresh head's as a fresh head
    assert lpft[1]["valid_loss"] == pytest.approx(lpft[0]["valid_loss"], rel=1e-3)
    assert plain[1]["valid_loss"] > plain[0]["valid_loss"] + 0.1


def test_k_fold_calibration_end_to_end_uses_every_labelled_sequence(pfam3, tmp_path):
    import json

    from distill.recipes.finetune import finetune

    n = sum(1 for _ in read_fasta(pfam3["train"]))
    cfg = FinetuneConfig(str(pfam3["tiny"]), [str(pfam3["train"])], "pfam", str(tmp_path / "run"), epochs=1, batch_size=8,
                         valid_fraction=0.2, folds=2, quiet=True)  # fmt: skip
    bundle = finetune(cfg).bundle
    c = json.loads((bundle / "heads" / "pfam" / "labels.json").read_text())["calibration"]
    assert c["pool"] == "out-of-fold (2 folds)" and c["n_valid"] == n and c["n_negatives"] == n  # each sequence and its shuffle
    assert all((tmp_path / "run" / "folds" / str(k) / "scores.npz").exists() for k in range(2))
    with pytest.raises(ValueError, match="--folds must be 0 or at least 2"):
        FinetuneConfig("m", ["x"], "pfam", "o", folds=1).validate()
