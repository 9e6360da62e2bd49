"""The linear probe a fine-tune must beat: fitting it, deciding which of the two the bundle keeps, and the report of
what it kept and how its head calls.

A fine-tune on a few dozen sequences a class can end below a linear probe of the same frozen encoder (Kumar et al.
2022), so the recipe fits that probe first and keeps it unless fine-tuning beats it. The decision is made on the
best evidence at hand:

- with k-fold calibration (small data sets: distill.recipes.finetune_folds) every fold fits both a probe and a
  fine-tune, so both kinds have out-of-fold scores of every labelled sequence; the kind with the higher out-of-fold
  macro-F1 wins (a tie keeps the cheaper probe). A kept probe is then fitted again on all labelled sequences, as
  ``distill probe`` fits one: at 5 examples a class the validation part is a fifth of the data;
- without folds (large data sets), the validation part's macro-F1 decides: the probe is "epoch 0" of the run.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from rich.console import Console
from rich.markup import escape

from distill.core.calibration import describe, probe_negatives, refusal, shuffled
from distill.core.config import FinetuneConfig
from distill.core.heads import ProbeHead
from distill.core.model import ESM
from distill.inference.embeddings import embed
from distill.recipes.finetune_data import Data
from distill.recipes.finetune_folds import joined
from distill.recipes.probe import choose_class_weights, classification_metrics, train_head

KINDS = ("probe", "tuned")  # the two models every fold scores with: its probe baseline, its best fine-tuning epoch


def fit_probe(model: ESM, sequences: list[str], y: np.ndarray, n_classes: int, cfg: FinetuneConfig, weights: str,
              cosine_scale: float, valid: tuple[np.ndarray, np.ndarray] | None = None) -> ProbeHead:  # fmt: skip
    """A linear head on the frozen encoder's standardised features, with outlier exposure as ``distill probe`` has it;
    early stopping on ``valid`` (features, labels), else on a tenth of ``sequences``."""
    device = next(model.parameters()).device
    x = embed(model.eval(), sequences, cfg.pooling, cfg.max_tokens, str(device))
    negatives = None
    if cfg.negative_rate > 0:
        pick = probe_negatives(len(sequences), cfg.seed)
        negatives = embed(model, shuffled([sequences[i] for i in pick], cfg.seed), cfg.pooling, cfg.max_tokens, str(device))
    probe, _ = train_head(x, y, n_classes, seed=cfg.seed, class_weights=weights, valid=valid, cosine_scale=cosine_scale,
                          negatives=negatives)  # fmt: skip
    return probe.to(device)


def refit_probe(model: ESM, d: Data, cfg: FinetuneConfig, cosine_scale: float) -> ProbeHead:
    """The kept probe, fitted on every labelled sequence (training and validation parts) in input order: the head
    ``distill probe MODEL --data FILES --seed S`` fits on them (same features, order, negatives and seed)."""
    ds, y = joined(d)
    if d.order is not None:
        rows = np.argsort(d.order, kind="stable")
        ds, y = ds.subset(rows), y[rows]
    weights, _ = choose_class_weights(cfg.class_weights, Counter(ds.labels))
    return fit_probe(model, ds.sequences, y, len(d.labels), cfg, weights, cosine_scale)


def oof_f1(oof: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
    """Each kind's out-of-fold macro-F1 over every labelled sequence."""
    return {kind: classification_metrics(s["y"], s["logits"].argmax(1))["f1_macro"] for kind, s in oof.items()}


def probe_kept(counters: dict) -> bool:
    """True when fine-tuning did not beat the probe: on out-of-fold scores when the run has them, else on the
    validation part's macro-F1 (a tie keeps the cheaper probe)."""
    if "oof_f1" in counters:
        return counters["oof_f1"]["tuned"] <= counters["oof_f1"]["probe"]
    return counters["best_f1"] <= counters.get("probe_f1", -1.0)


def kept_note(counters: dict, n_labelled: int) -> str | None:
    """What the report says when the probe is kept, with the figures that decided it; None when the fine-tune is."""
    if not probe_kept(counters):
        return None
    if "oof_f1" in counters:
        f1 = counters["oof_f1"]
        return (f"fine-tuning did not beat the linear probe out of fold (macro-F1 {f1['tuned']:.4f} against the probe's "
                f"{f1['probe']:.4f} over {n_labelled} labelled sequences): the bundle keeps a probe fitted on all of them, "
                "on the unchanged encoder")  # fmt: skip
    return (f"fine-tuning did not beat the linear probe on validation (macro-F1 {counters['probe_f1']:.4f} against the best "
            f"epoch's {counters['best_f1']:.4f}): the bundle keeps the probe's head on the unchanged encoder")  # fmt: skip


def report(calibration: dict, cfg: FinetuneConfig, counters: dict, console: Console) -> None:
    """What the run kept and how its head calls: the probe fall-back, the calibration, the background, a refusal."""
    if note := kept_note(counters, calibration["n_valid"]):
        console.print(f"[yellow]note:[/] {note}")
    console.print(describe(calibration))
    if "background" in calibration:
        b = calibration["background"]
        console.print(f"background {escape(b['name'])}: {b['presumed_members']} presumed members; {b['proteins']} held-out proteins scanned "
                      f"in windows of {calibration['scan']['window']}, {b['raised']} labels' thresholds raised above their best non-member"
                      + (f", {len(b['uncallable'])} never called ({', '.join(b['uncallable'][:5])})" if b["uncallable"] else ""))  # fmt: skip
    if not calibration["reached"]:
        console.print(f"[yellow]warning:[/] {refusal(calibration)}")
