import json

import numpy as np
import pytest
import torch
from conftest import EXAMPLES, shared
from sklearn.metrics import f1_score
from typer.testing import CliRunner

from distill.cli.app import app
from distill.core import tokens
from distill.core.bundle import save_bundle
from distill.core.config import ModelConfig
from distill.core.data import sequence_digests
from distill.core.heads import HeadError, ProbeHead, heads_of, load_head
from distill.core.labels import LabelledSet, LabelRule, read_labelled
from distill.core.model import ESM
from distill.inference import embeddings
from distill.recipes import probe as probe_mod
from distill.recipes.probe import classification_metrics, make_split, run_probe

runner = CliRunner()
TEACHER = EXAMPLES / "teacher" / "tiny_esm1b_t4_192.pt"


def test_metrics_match_hand_computation():
    truth = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "a"]
    m = classification_metrics(truth, pred)
    # per class (precision, recall, F1): a (1/2, 1/2, 1/2), b (2/3, 1, 4/5), c (0, 0, 0); supports 2, 2, 1
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision_macro"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert m["recall_macro"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert m["f1_macro"] == pytest.approx((1 / 2 + 4 / 5 + 0) / 3)
    assert m["precision_weighted"] == pytest.approx((2 * 1 / 2 + 2 * 2 / 3) / 5)
    assert m["recall_weighted"] == pytest.approx(3 / 5)
    assert m["f1_weighted"] == pytest.approx((2 * 1 / 2 + 2 * 4 / 5) / 5)


def toy(labels: list[str], groups: list[str] | None = None) -> LabelledSet:
    n = len(labels)
    return LabelledSet([f"r{i}" for i in range(n)], ["MKV"] * n, labels, groups or labels, ["x"] * n)


def test_random_split_is_stratified_seeded_and_drops_rare_labels_with_a_count():
    ds = toy(["a"] * 20 + ["b"] * 10 + ["c"] * 3)
    split = make_split(ds, "random", seed=0, min_per_class=5)
    assert split.notes == ["dropped 1 labels with fewer than 5 examples (3 sequences)"]
    assert {ds.labels[i] for i in split.test} == {"a", "b"} and len(split.test) == 6
    assert not set(split.train) & set(split.test) and len(split.train) + len(split.test) == 30
    assert (make_split(ds, "random", seed=0, min_per_class=5).test == split.test).all()
    with pytest.raises(ValueError, match="fewer than 2 classes"):
        make_split(toy(["a"] * 20 + ["b"] * 3), "random", seed=0, min_per_class=5)


def test_family_holdout_tests_unseen_families_of_seen_superfamilies():
    ds = read_labelled(str(EXAMPLES / "scope.fasta"), "scope")
    split = make_split(ds, "family-holdout", seed=0, min_per_class=10)
    train_fams = {ds.groups[i] for i in split.train}
    test_fams = {ds.groups[i] for i in split.test}
    assert test_fams and not train_fams & test_fams
    assert {ds.labels[i] for i in split.test} <= {ds.labels[i] for i in split.train}
    assert 0.1 < len(split.test) / len(ds) < 0.5
    with pytest.raises(ValueError, match="needs family labels"):
        make_split(read_labelled(str(EXAMPLES / "pfam.fasta"), "pfam"), "family-holdout", seed=0)


def test_superfamily_holdout_tests_unseen_superfamilies_of_seen_folds():
    ds = read_labelled(str(EXAMPLES / "scope.fasta"), LabelRule("scope", level="fold"))
    split = make_split(ds, "superfamily-holdout", seed=0, min_per_class=10)
    superfamily = [".".join(g.split(".")[:3]) for g in ds.groups]
    train_sf = {superfamily[i] for i in split.train}
    test_sf = {superfamily[i] for i in split.test}
    assert test_sf and not train_sf & test_sf
    assert {ds.labels[i] for i in split.test} <= {ds.labels[i] for i in split.train}
    assert all(label.count(".") == 1 for label in ds.labels)  # folds: a.1
    with pytest.raises(ValueError, match="--level fold"):
        make_split(read_labelled(str(EXAMPLES / "scope.fasta"), "scope"), "superfamily-holdout", seed=0)


def test_probe_calibration_scores_every_example_and_negative_with_a_head_that_never_saw_it(monkeypatch):
    """Row r's feature is r (negatives: 1000 + the row they were shuffled from); a stub head records what it trained
    on and gives every row its true class a margin of 8, every negative a flat score."""
    n, classes = 60, 3
    y = np.arange(n) % classes
    x = np.arange(n, dtype=np.float32)[:, None]
    source = np.array([0, 7, 7, 33, 59])
    negatives = (1000 + source).astype(np.float32)[:, None]
    trained: list[set[int]] = []

    def stub_train_head(xs, ys, k, *args, **kwargs):
        seen = {int(v) for v in xs[:, 0]}
        trained.append(seen)

        def head(t):
            rows = t[:, 0].long()
            out = torch.zeros(len(rows), k)
            for i, r in enumerate(rows.tolist()):
                assert (r - 1000 if r >= 1000 else r) not in seen, f"row {r} scored by a head that trained on it"
                if r < 1000:
                    out[i, y[r]] = 8.0
            return out

        return head, {}

    monkeypatch.setattr(probe_mod, "train_head", stub_train_head)
    c = probe_mod.calibrate_out_of_fold(x, y, classes, negatives, source, target=0.95, confidence=0.9)
    assert len(trained) == 5 and all(len(t) == 48 for t in trained)  # each head on 4 of 5 folds
    assert set.union(*[set(range(n)) - t for t in trained]) == set(range(n))  # every row held out once
    assert c["pool"] == "out-of-fold (5 folds)" and c["n_valid"] == 60 and c["n_negatives"] == 5
    # all 60 right and above every negative: the bound of 60 right of 60 at 90% is 0.1 ** (1 / 60) = 0.9624 >= 0.95
    assert c["reached"] and c["coverage"] == 1.0 and c["precision_lower"] == pytest.approx(0.1 ** (1 / 60), abs=1e-6)
    c99 = probe_mod.calibrate_out_of_fold(x, y, classes, negatives, source, target=0.99, confidence=0.9)
    assert not c99["reached"] and c99["threshold"] > 1  # no calls: 60 calls cannot show 0.99 at 90% confidence (that takes 230)


def test_outlier_exposure_teaches_a_probe_to_doubt_what_only_looks_like_a_class():
    """Negatives share class 0's first feature (a shuffled member keeps its family's composition) and differ in the
    second; without them the head ignores the second feature and calls them class 0."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)
    x = np.c_[np.where(y == 0, 2.0, -2.0), np.zeros(200)] + rng.normal(0, 0.3, (200, 2))
    negatives = np.c_[np.full(100, 2.0), np.full(100, 3.0)] + rng.normal(0, 0.3, (100, 2))

    def confidence(head, features):
        with torch.no_grad():
            return torch.softmax(head(torch.from_numpy(features.astype(np.float32))), -1).max(-1).values.numpy()

    plain, _ = probe_mod.train_head(x, y, 2, seed=0)
    exposed, _ = probe_mod.train_head(x, y, 2, seed=0, negatives=negatives)
    assert confidence(plain, negatives).mean() > 0.9 and confidence(exposed, negatives).mean() < 0.7  # 0.95 -> 0.62
    with torch.no_grad():
        assert (exposed(torch.from_numpy(x.astype(np.float32))).argmax(-1).numpy() == y).mean() == 1.0
    assert confidence(exposed, x).mean() > 0.97 * confidence(plain, x).mean()  # members keep their confidence


def test_embedding_cache_pooling_and_composition(monkeypatch):
    feat = embeddings.featurizer(str(TEACHER))
    seqs = ["MKTAYIAKQR", "GSHMLEDPVKK", "MKV"]
    mean = feat.features(seqs, "mean")
    cls = feat.features(seqs, "cls")
    with torch.no_grad():
        toks = torch.from_numpy(tokens.pad_batch([tokens.encode(s) for s in seqs]))
        reps = feat.model(toks)["representations"]
    np.testing.assert_allclose(cls, reps[:, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(mean[2], reps[2, 1:4].mean(0).numpy(), atol=1e-5)
    monkeypatch.setattr(embeddings, "embed", lambda *a, **k: pytest.fail("recomputed a cached embedding"))
    np.testing.assert_array_equal(feat.features(seqs, "mean"), mean)
    comp = embeddings.featurizer("composition").features(["AAKL"], "mean")
    assert comp[0, tokens.RESIDUE_LETTERS.index("A")] == 0.5 and comp.sum() == pytest.approx(1.0)


def test_linear_probe_on_a_tiny_model_is_well_above_chance_on_real_scope_superfamilies():
    ds = read_labelled(str(shared("scope/astral-scopedom-40-2.07.shared85.fa")), "scope")
    rng = np.random.default_rng(0)
    big = [label for label, n in ds.counts().most_common(12)]
    take = np.concatenate([rng.choice([i for i, x in enumerate(ds.labels) if x == label], 40, replace=False) for label in big])
    ds = ds.subset(take)
    x = embeddings.featurizer(str(TEACHER)).features(ds.sequences, "mean")
    split = make_split(ds, "random", seed=0)
    result = run_probe(x, ds, "scope", split, {"test": True})
    chance = 1 / 12
    assert result.metrics["classes"] == 12 and result.metrics["n_test"] == 96
    assert result.metrics["accuracy"] > 3 * chance, result.metrics
    assert result.metrics["f1_macro"] == pytest.approx(f1_score(result.y_true, result.y_pred, average="macro"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny random bundle whose recorded training set is the first 100 sequences of examples/pfam.fasta."""
    torch.manual_seed(0)
    pfam = read_labelled(str(EXAMPLES / "pfam.fasta"), "pfam")
    digests = sequence_digests([tokens.encode(s) for s in pfam.sequences[:100]])
    return save_bundle(tmp_path_factory.mktemp("b") / "student", ESM(ModelConfig(2, 32, 4, 64)), "custom", {"lam": 0}, digests)


def test_cli_probe_writes_head_export_carries_it_and_onnx_matches_torch(bundle, tmp_path):
    res = runner.invoke(app, ["probe", str(bundle), "--data", str(EXAMPLES / "pfam.fasta"), "--task", "pfam", "--min-per-class", "5"])
    assert res.exit_code == 0, res.output
    assert "Protocol: frozen-embedding linear probe" in res.output and "| Accuracy |" in res.output
    assert "Task pfam: 54 classes, 648 training and 162 test sequences" in res.output
    assert "test sequences" in res.output and "MLM training data" in res.output  # the overlap warning
    head = heads_of(bundle, 32)["pfam"]
    assert len(head.labels) == 54 and head.card["metrics"]["n_test"] == 162 and head.pooling == "mean"
    c = head.card["calibration"]  # every training sequence scored out of fold, + 648 shuffled ones
    assert c["n_negatives"] == 648 and c["n_valid"] == 648 and c["pool"] == "out-of-fold (5 folds)" and c["confidence"] == 0.9
    assert head.module.temperature.item() == pytest.approx(c["temperature"])
    assert "calibration: temperature" in res.output and "no-call below" in res.output
    # a random 32-dim model: shuffles score like members, so no threshold is believed and the head says why
    assert not c["reached"] and c["threshold"] > 1 and "so every call of this head is a no-call" in res.output

    onnx_path = tmp_path / "s.onnx"
    res = runner.invoke(app, ["export", "onnx", str(bundle), "-o", str(onnx_path), "--heads"])
    assert res.exit_code == 0, res.output
    from distill.inference import resolve, top_k

    emb = resolve(onnx_path)
    assert emb.labels["pfam"] == head.labels and emb.thresholds["pfam"] == pytest.approx(head.min_probability)
    seqs = read_labelled(str(EXAMPLES / "pfam.fasta"), "pfam").sequences[:7]
    got = emb.embed(seqs)
    feats = embeddings.featurizer(str(bundle)).features(seqs, "mean")
    want = head.probabilities(feats)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.probabilities["pfam"], w, atol=1e-5)
    best = top_k(got[0].probabilities["pfam"], emb.labels["pfam"], 3)
    assert [b[0] for b in best] == [head.labels[i] for i in np.argsort(-want[0])[:3]]
    with pytest.raises(ValueError, match="no scope head in this model"):
        emb.embed(seqs, tasks=["scope"])


def test_head_errors(bundle, tmp_path):
    res = runner.invoke(app, ["probe", str(TEACHER), "--data", str(EXAMPLES / "pfam.fasta"), "--task", "pfam"])
    assert res.exit_code == 2 and "pass --out DIR" in res.output
    res = runner.invoke(app, ["probe", str(bundle), "--data", str(EXAMPLES / "pfam.fasta"), "--task", "pfam", "--min-per-class", "50"])
    assert res.exit_code == 2 and "fewer than 2 classes have at least 50 examples" in res.output
    head_dir = tmp_path / "h"
    res = runner.invoke(
        app,
        ["probe", "composition", "--data", str(EXAMPLES / "pfam.fasta"), "--task", "pfam", "--out", str(head_dir), "--min-per-class", "5"],
    )
    assert res.exit_code == 0, res.output
    with pytest.raises(HeadError, match="trained on 25-dim embeddings, but the model's width is 32"):
        load_head(head_dir, dim=32)
    (head_dir / "head.safetensors").write_bytes(b"garbage")
    with pytest.raises(HeadError, match="corrupt"):
        load_head(head_dir)
    (head_dir / "labels.json").write_text("{not json")
    with pytest.raises(HeadError, match="labels.json"):
        load_head(head_dir)


def test_cli_evaluate_writes_one_table_csv_json_and_figures(bundle, tmp_path, monkeypatch):
    from sklearn.manifold import TSNE

    monkeypatch.setattr("distill.recipes.plots.TSNE", TSNE)  # the real figures (conftest draws the other tests' with PCA)
    out = tmp_path / "eval"
    args = ["evaluate", str(TEACHER), str(bundle), "--data", str(EXAMPLES / "scope.fasta"), "--task", "scope"]
    args += ["--split", "family-holdout", "--baselines", "--ppl-data", str(EXAMPLES / "valid.fasta"), "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["tiny_esm1b_t4_192", "Student-h32-L2-vanilla", "random-h32-L2", "composition"]
    assert "family-holdout split" in res.output and "| F1 (macro) |" in res.output and "| F1 (weighted) |" in res.output
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("model,spec,parameters,accuracy,precision_macro")
    assert float(csv_lines[1].split(",")[6]) == pytest.approx(rows[0]["f1_macro"])
    assert rows[0]["perplexity"] == pytest.approx(14.48, abs=0.01) and rows[3]["perplexity"] is None
    assert "ESM-2 baselines esm2_t6_8M_UR50D, esm2_t12_35M_UR50D are not in the torch hub cache" in res.output
    for png in ("tsne.png", "confusion.png", "perplexity.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / png).stat().st_size > 10_000


def test_cls_pooled_head_exports_and_matches_torch(tmp_path):
    torch.manual_seed(1)
    b = save_bundle(tmp_path / "student", ESM(ModelConfig(2, 32, 4, 64)), "custom")
    args = ["probe", str(b), "--data", str(EXAMPLES / "scope.fasta"), "--task", "scope", "--pooling", "cls", "--mlp"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    head = heads_of(b)["scope"]
    assert head.pooling == "cls" and head.card["hidden"] == 256
    res = runner.invoke(app, ["export", "onnx", str(b), "-o", str(tmp_path / "s.onnx"), "--heads"])
    assert res.exit_code == 0, res.output  # the export's parity check covers the head probabilities
    from distill.inference import resolve
    from export.onnx import read_metadata

    assert read_metadata(tmp_path / "s.onnx")["heads"]["scope"]["pooling"] == "cls"
    seqs = read_labelled(str(EXAMPLES / "scope.fasta"), "scope").sequences[:5]
    onnx_probs = [e.probabilities["scope"] for e in resolve(tmp_path / "s.onnx").embed(seqs)]
    torch_probs = [e.probabilities["scope"] for e in resolve(str(b)).embed(seqs)]
    np.testing.assert_allclose(onnx_probs, torch_probs, atol=1e-4)  # the export contract's fp32 bound


def test_class_weights_none_beats_balanced_on_many_singleton_classes_and_auto_picks_none():
    """Real SCOPe families of the bundled sample: 159 classes, 83 of them singletons. One member of every family with
    two or more is held out; balanced weights lose top-1 accuracy there (checked, not assumed), and auto says why."""
    from distill.core.labels import LabelRule
    from distill.recipes.probe import Split

    ds = read_labelled(str(EXAMPLES / "scope.fasta"), LabelRule("scope", level="family"))
    x = embeddings.featurizer(str(TEACHER)).features(ds.sequences, "mean")
    members: dict[str, list[int]] = {}
    for i, label in enumerate(ds.labels):
        members.setdefault(label, []).append(i)
    test = np.array(sorted(m[-1] for m in members.values() if len(m) >= 2))
    split = Split(np.setdiff1d(np.arange(len(ds)), test), test, [])
    top1 = {
        w: np.mean([run_probe(x, ds, "scope", split, {}, seed=s, class_weights=w).metrics["accuracy"] for s in range(3)])
        for w in ("none", "balanced")
    }
    assert top1["none"] > top1["balanced"], top1
    auto = run_probe(x, ds, "scope", split, {}, class_weights="auto")
    assert auto.metrics["class_weights"] == "none" and auto.head.card["protocol"]["class_weights"] == "none"
    assert any(n.startswith("class weights none (auto: 132 of 159 classes have fewer than 5") for n in auto.notes)


def test_a_free_task_from_a_tsv_goes_through_probe_export_and_annotate(bundle, tmp_path):
    """Labels kept as written (here 'family:PF00041'), head, ONNX output and TSV columns named after the task."""
    pfam = read_labelled(str(EXAMPLES / "pfam.fasta"), "pfam")
    tsv = tmp_path / "fam.tsv"
    tsv.write_text("".join(f"{i}\tfamily:{lab}\t{s}\n" for i, lab, s in zip(pfam.ids, pfam.labels, pfam.sequences, strict=True)))
    res = runner.invoke(app, ["probe", str(bundle), "--data", str(tsv), "--task", "fam_text", "--min-per-class", "5"])
    assert res.exit_code == 0, res.output
    assert (
        "class weights balanced (auto: every class has at least 5" in res.output
        and "cross-entropy with balanced class weights" in res.output
    )
    assert load_head(bundle / "heads" / "fam_text").labels[0] == "family:PF00004"
    graph = tmp_path / "f.onnx"
    res = runner.invoke(app, ["export", "onnx", str(bundle), "-o", str(graph), "--heads"])
    assert res.exit_code == 0, res.output
    fasta = tmp_path / "q.fa"
    fasta.write_text("".join(f">{i}\n{s}\n" for i, s in zip(pfam.ids[:5], pfam.sequences[:5], strict=True)))
    out = tmp_path / "calls.tsv"
    res = runner.invoke(
        app, ["annotate", str(fasta), "--model", str(graph), "-o", str(out), "--tasks", "fam_text", "--min-probability", "0", "--quiet"]
    )
    assert res.exit_code == 0, res.output
    header, *rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert header[:4] == ["id", "length", "fam_text_label_1", "fam_text_prob_1"]
    assert len(rows) == 5 and all(r[2].startswith("family:PF") for r in rows)
    res = runner.invoke(app, ["probe", str(bundle), "--data", str(tsv), "--task", "fam text"])
    assert res.exit_code == 2 and "task name 'fam text' is not usable" in res.output


def test_probe_early_stops_on_a_given_validation_file(bundle, tmp_path):
    pfam = read_labelled(str(EXAMPLES / "pfam.fasta"), "pfam")
    valid = tmp_path / "valid.tsv"
    valid.write_text("".join(f"v{i}\t{lab}\t{s}\n" for i, (lab, s) in enumerate(zip(pfam.labels[::3], pfam.sequences[::3], strict=True))))
    out = tmp_path / "head"
    res = runner.invoke(
        app, ["probe", str(bundle), "--data", str(EXAMPLES / "pfam.fasta"), "--task", "pfam", "--valid", str(valid), "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "early stopping on the --valid files" in " ".join(res.output.split())
    assert "the --valid files" in load_head(out).card["protocol"]["loss"]


def test_a_cosine_head_written_with_its_old_unused_bias_still_loads_with_the_same_outputs(tmp_path):
    """Heads fine-tuned before 2026-11-29 stored a last-layer bias that cosine logits never read."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    head = ProbeHead(8, 3, cosine_scale=16.0)
    card = {"format": "esm-distill-head", "labels": ["a", "b", "c"], "dim": 8, "hidden": 0, "cosine_scale": 16.0}
    (tmp_path / "labels.json").write_text(json.dumps(card))
    save_file(head.state_dict() | {"net.0.bias": torch.randn(3)}, str(tmp_path / "head.safetensors"))
    z = torch.randn(5, 8)
    loaded = load_head(tmp_path, dim=8)
    torch.testing.assert_close(loaded.module(z), head(z))
    save_file(head.state_dict() | {"net.0.stray": torch.randn(3)}, str(tmp_path / "head.safetensors"))
    with pytest.raises(HeadError, match="corrupt or does not match"):
        load_head(tmp_path)
