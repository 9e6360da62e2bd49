"""distill finetune: lifts accuracy over the frozen probe, resumes exactly, task distillation by hand, no-call, bad input."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import EXAMPLES, write_labelled
from typer.testing import CliRunner

from distill.cli.app import app
from distill.core.bundle import save_bundle
from distill.core.calibration import shuffled
from distill.core.config import FinetuneConfig, ModelConfig
from distill.core.fasta import read_fasta
from distill.core.heads import heads_of
from distill.core.model import build_student
from distill.recipes.finetune import finetune, task_loss

runner = CliRunner()
FAMILIES = ("PF00004", "PF00005", "PF00072", "PF00076")
TINY = ModelConfig(layers=2, dim=32, heads=2, ffn=64)


@pytest.fixture(scope="module")
def pfam4(tmp_path_factory) -> dict:
    """4 real Pfam families of the bundled sample: 10 training and 5 test domains each; a tiny random bundle."""
    root = tmp_path_factory.mktemp("pfam4")
    records = list(read_fasta(EXAMPLES / "pfam.fasta"))
    train, test = [], []
    for fam in FAMILIES:
        members = [r for r in records if r.description == fam]
        train += members[:10]
        test += members[10:15]
    save_bundle(root / "tiny", build_student(TINY, seed=0), None)
    return {"root": root, "train": write_labelled(root / "train.fasta", train), "test": test, "tiny": root / "tiny"}


def config(pfam4: dict, out: Path, **kw) -> FinetuneConfig:
    # the plain recipe (no LP-FT, calibrated on the validation part at the point precision: 8 validation sequences
    # cannot back a 90% bound, and an unreached head calls nothing): LP-FT, k-fold calibration and the confidence
    # rule have tests of their own
    args = {
        "confidence": 0.0,
        "epochs": 15,
        "batch_size": 8,
        "lr": 3e-3,
        "valid_fraction": 0.2,
        "patience": 100,
        "quiet": True,
        "lp_ft": False,
        "folds": 0,
    } | kw
    return FinetuneConfig(str(pfam4["tiny"]), [str(pfam4["train"])], "pfam", str(out), **args)


@pytest.fixture(scope="module")
def tuned(pfam4) -> Path:
    return finetune(config(pfam4, pfam4["root"] / "run")).bundle


def accuracy(model_spec: str, test: list) -> float:
    from distill.inference import resolve

    e = resolve(model_spec, providers="cpu")
    p = e.run([r.sequence for r in test], ["pfam"])[1]["pfam"]
    return float(np.mean([e.labels["pfam"][i] == r.description for i, r in zip(p.argmax(1), test, strict=True)]))


def test_finetuning_beats_the_linear_probe_of_the_same_model(pfam4, tuned):
    from distill.inference.embeddings import featurizer
    from distill.recipes.probe import train_head

    labels = sorted(FAMILIES)
    feat = featurizer(str(pfam4["tiny"]))
    train = list(read_fasta(pfam4["train"]))
    head, _ = train_head(feat.features([r.sequence for r in train]), np.array([labels.index(r.description) for r in train]), 4)
    with torch.no_grad():
        pred = head(torch.from_numpy(feat.features([r.sequence for r in pfam4["test"]]))).argmax(1).numpy()
    probe = np.mean([labels[i] == r.description for i, r in zip(pred, pfam4["test"], strict=True)])
    tuned_acc = accuracy(str(tuned), pfam4["test"])
    assert tuned_acc >= probe + 0.1, (tuned_acc, probe)  # measured 0.85 vs 0.65


def test_the_bundle_carries_one_calibrated_head_with_its_parent(pfam4, tuned):
    heads = heads_of(tuned)
    assert list(heads) == ["pfam"]
    card = heads["pfam"].card
    assert heads["pfam"].labels == sorted(FAMILIES) and card["protocol"]["kind"] == "fine-tuned"
    assert card["parent"]["model"] == str(pfam4["tiny"]) and len(card["parent"]["fingerprint"]) == 64
    c = card["calibration"]
    assert set(c) >= {"temperature", "threshold", "ece_before", "ece_after", "coverage", "precision", "target_precision"}
    assert heads["pfam"].module.temperature.item() == pytest.approx(c["temperature"])  # applied when loaded


def test_resume_after_a_stop_gives_identical_weights(pfam4, tmp_path):
    whole = finetune(config(pfam4, tmp_path / "whole", epochs=3)).bundle
    stopped = finetune(config(pfam4, tmp_path / "split", epochs=3), stop_after=1)
    assert stopped.bundle is None and stopped.metrics["epoch"] == 1
    resumed = finetune(config(pfam4, tmp_path / "split", epochs=3), resume=True).bundle
    for name in ("model.safetensors", "heads/pfam/head.safetensors"):
        assert (whole / name).read_bytes() == (resumed / name).read_bytes(), name
    with pytest.raises(ValueError, match="differ from the run.*lr"):
        finetune(config(pfam4, tmp_path / "split", epochs=3, lr=1e-2), resume=True)


def test_task_distillation_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [1.0, 1.0, 3.0]])
    soft = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [9.0, 9.0, 9.0]])
    y = torch.tensor([0, 1, -1])  # the last row is a shuffled negative
    cfg = FinetuneConfig("m", [], "pfam", "o", lam=0.3, temperature=2.0, negative_weight=0.5)
    got = task_loss(logits, y, None, soft, cfg)

    def log_softmax(v: np.ndarray) -> np.ndarray:
        return v - np.log(np.exp(v).sum())

    z, s, expect = logits.numpy(), soft.numpy(), 0.0
    for row, label in ((0, 0), (1, 1)):
        ce = -log_softmax(z[row])[label]
        p_t, log_p_s = np.exp(log_softmax(s[row] / 2)), log_softmax(z[row] / 2)
        kl = (p_t * (np.log(p_t) - log_p_s)).sum()
        expect += 0.7 * ce + 0.3 * 4 * kl
    expect += 0.5 * -log_softmax(z[2]).mean()  # cross-entropy to the uniform distribution
    assert got.item() == pytest.approx(expect, rel=1e-5)
    assert task_loss(logits[:2], y[:2], None, None, cfg).item() == pytest.approx(F.cross_entropy(logits[:2], y[:2], reduction="sum").item())


def test_a_small_student_learns_from_a_fine_tuned_teacher(pfam4, tuned, tmp_path):
    result = finetune(config(pfam4, tmp_path / "kd", epochs=2, teacher=str(tuned), lam=0.5))
    assert heads_of(result.bundle)["pfam"].card["protocol"]["teacher"] == str(tuned)
    with pytest.raises(ValueError, match="has no pfam head"):
        finetune(config(pfam4, tmp_path / "kd2", epochs=1, teacher=str(pfam4["tiny"])))


def test_shuffled_sequences_get_the_no_call_while_real_ones_are_called(pfam4, tuned, tmp_path):
    from distill.inference import resolve

    e = resolve(str(tuned), providers="cpu")
    threshold = e.thresholds["pfam"]
    real = [r.sequence for r in pfam4["test"]]
    p_shuf = e.run(shuffled(real, 5), ["pfam"])[1]["pfam"].max(1)
    # The calibrated threshold is reachable and rejects shuffled proteins. How many real ones a model then calls is a
    # matter of its quality: this 32-dim model on 40 sequences calls few; `small` on real Pfam calls 0.75 of them at
    # 99% precision (benchmarks/classify_vs_hmmer.py). Calls above and below the threshold are checked in the TSV below.
    assert 0 < threshold < 1 and (p_shuf < threshold).mean() >= 0.8, (threshold, p_shuf)
    fasta = tmp_path / "q.fasta"
    fasta.write_text(f">real\n{real[0]}\n>shuffled\n{shuffled(real, 5)[0]}\n")
    ok = runner.invoke(app, ["annotate", str(fasta), "-o", str(tmp_path / "a.tsv"), "--model", str(tuned), "--quiet"])
    assert ok.exit_code == 0, ok.output
    rows = [line.split("\t") for line in (tmp_path / "a.tsv").read_text().splitlines()]
    by_id = {r[0]: r for r in rows[1:]}
    p = float(by_id["shuffled"][3])
    assert (by_id["shuffled"][2] == "-") == (p < threshold)
    assert (by_id["real"][2] == "-") == (float(by_id["real"][3]) < threshold) and by_id["real"][2] in (*FAMILIES, "-")
    forced = runner.invoke(
        app, ["annotate", str(fasta), "-o", str(tmp_path / "b.tsv"), "--model", str(tuned), "--quiet", "--min-probability", "0"]
    )
    assert forced.exit_code == 0 and "\t-\t" not in (tmp_path / "b.tsv").read_text()


@pytest.mark.parametrize(
    "families, extra, message",
    [
        (("PF00004",), [], "only one class"),
        (FAMILIES, ["--min-per-class", "50"], "fewer than 2 classes have 50 training sequences"),
        (FAMILIES, ["--valid-fraction", "0.01"], "no validation sequences"),
    ],
)
def test_bad_labelled_data_is_refused_before_anything_is_written(pfam4, tmp_path, families, extra, message):
    data = write_labelled(tmp_path / "d.fasta", [r for r in read_fasta(pfam4["train"]) if r.description in families])
    out = tmp_path / "run"
    result = runner.invoke(app, ["finetune", str(pfam4["tiny"]), "--data", str(data), "--task", "pfam", "--out", str(out), *extra])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()


def test_validation_labels_unknown_to_training_are_refused(pfam4, tmp_path):
    records = list(read_fasta(EXAMPLES / "pfam.fasta"))
    valid = write_labelled(tmp_path / "v.fasta", [r for r in records if r.description == "PF00018"][:3])
    args = [
        "finetune",
        str(pfam4["tiny"]),
        "--data",
        str(pfam4["train"]),
        "--valid",
        str(valid),
        "--task",
        "pfam",
        "--out",
        str(tmp_path / "r"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--valid has labels absent from the training data: PF00018" in result.output
    assert not (tmp_path / "r").exists()


def test_random_spec_with_a_seed(pfam4):
    from distill.inference.encoders import load_encoder

    a, b, c = load_encoder("random:small@1"), load_encoder("random:small@1"), load_encoder("random:small")
    assert a.fingerprint == b.fingerprint != c.fingerprint and a.card["preset"] == "small"
    with pytest.raises(ValueError, match="seed after @"):
        load_encoder("random:small@x")


def test_a_fine_tuned_cosine_head_exports_to_onnx_with_its_temperature_and_threshold(tuned, pfam4, tmp_path):
    from distill.inference import resolve

    res = runner.invoke(app, ["export", "onnx", str(tuned), "-o", str(tmp_path / "t.onnx"), "--heads"])
    assert res.exit_code == 0, res.output
    onnx, torch_ = resolve(tmp_path / "t.onnx"), resolve(str(tuned), providers="cpu")
    seqs = [r.sequence for r in pfam4["test"]]
    np.testing.assert_allclose(onnx.run(seqs, ["pfam"])[1]["pfam"], torch_.run(seqs, ["pfam"])[1]["pfam"], atol=1e-5)
    assert onnx.thresholds == torch_.thresholds and 0 < onnx.thresholds["pfam"] < 1
    assert heads_of(tuned)["pfam"].module.temperature.item() != 1.0  # so the graph must carry it


def test_torchrun_two_processes_match_one(pfam4, spawn, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    args = ["finetune", str(pfam4["tiny"]), "--data", str(pfam4["train"]), "--task", "pfam", "--epochs", "2", "--batch-size", "8",
            "--lr", "3e-3", "--valid-fraction", "0.2", "--folds", "0", "--quiet"]  # fmt: skip
    single = runner.invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", "-m", "distill"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = spawn([*cmd, *args, "--out", str(tmp_path / "two")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    rows = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "two")]
    assert rows[0][0]["train_loss"] is None and rows[1][0]["valid_loss"] == pytest.approx(rows[0][0]["valid_loss"], rel=1e-4)  # the probe
    assert [r["train_loss"] for r in rows[1][1:]] == pytest.approx([r["train_loss"] for r in rows[0][1:]], rel=1e-4)
    a, b = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("one", "two"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)
