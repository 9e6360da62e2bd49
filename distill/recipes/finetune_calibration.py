"""Calibrating a fine-tuned head: validation + negatives (or out-of-fold scores), for whole proteomes a background's
held-out half (the report of what the head calls: distill.recipes.finetune_fallback).

Without ``--background`` the head is calibrated as every head is (distill.core.calibration): temperature on the
validation pieces, one no-call threshold for the target precision over validation + shuffled + out-of-set pieces.

With ``--background PROTEOME`` the head is made for proteomes and calibrated the way it will be used: it scans
whole proteins in windows (distill.inference.scan), and the half of the background it never trained on is scanned
the same way. Two things come of that, as for a reference index with a background (``index_calibration``):

- each background protein that is a presumed member of no label adds its best window to the pool the global
  threshold is set on, so "none of these" is learnt from real full-length proteins, not only from shuffles;
- a label's own threshold is raised above the best window of any background protein that is not a presumed member
  of it (the gathering-threshold rule), by ``MARGIN`` in log-odds; presumed members (alignment at E <= 1e-5 to the
  label's training sequences: distill.inference.members) are left out, so true members of the background never
  set a threshold. A label whose non-members reach a probability that float32 cannot exceed (1.0) is never called
  by the head: listed as ``uncallable``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from distill.core.calibration import NEVER, calibrate, shuffled, softmax
from distill.core.config import SCAN_STRIDE, SCAN_WINDOW, FinetuneConfig
from distill.inference.scan import per_sequence, windows
from distill.recipes.finetune_data import Data

MARGIN = float(np.log(10.0))  # a raised threshold: ten times the best non-member's odds


def _raised(p_best: float) -> float:
    """``MARGIN`` above a probability, in log-odds (NEVER when nothing in float32 lies above it)."""
    p = float(np.float32(p_best))
    if p >= 1.0:
        return NEVER
    return float(1.0 / (1.0 + (1.0 - p) / p * np.exp(-MARGIN)))


def calibrate_head(logits_of: Callable[[list[str]], np.ndarray], d: Data, cfg: FinetuneConfig,
                   oof: dict[str, np.ndarray] | None = None) -> tuple[dict[str, Any], np.ndarray]:  # fmt: skip
    """The card's calibration section and the logits it was set on (``logits_of``: sequences -> the head's raw logits):
    the validation part's, or with ``oof`` (distill.recipes.finetune_folds: one kind's) the out-of-fold ones."""
    if oof is not None:
        c = calibrate(oof["logits"], oof["y"], oof["negative_logits"], cfg.target_precision, confidence=cfg.confidence)
        return c | {"pool": f"out-of-fold ({oof['folds']} folds)"}, oof["logits"]
    negatives = shuffled(d.valid.sequences, cfg.seed) + d.outside
    valid_logits, negative_logits = logits_of(d.valid.sequences), logits_of(negatives)
    if d.background is None:
        return calibrate(valid_logits, d.y_valid, negative_logits, cfg.target_precision, confidence=cfg.confidence), valid_logits
    bg = d.background
    cut, pieces = windows(bg.calibration, SCAN_WINDOW, SCAN_STRIDE)
    per_protein = per_sequence(cut, logits_of(pieces))  # each protein's windows' logits
    outside = [i for i, m in enumerate(bg.members) if not m]
    best_windows = [z[softmax(z).max(1).argmax()] for z in (per_protein[i] for i in outside)]  # its most confident window
    pool = np.r_[negative_logits, np.array(best_windows).reshape(-1, len(d.labels))]
    c = calibrate(valid_logits, d.y_valid, pool, cfg.target_precision, confidence=cfg.confidence)
    best = np.stack([softmax(z / c["temperature"]).max(0) for z in per_protein])  # [proteins, labels]: each label's best window
    raised = {}
    for k, label in enumerate(d.labels):
        noise = best[[i for i, m in enumerate(bg.members) if label not in m], k]
        if len(noise) and noise.max() >= c["threshold"]:
            raised[label] = _raised(noise.max())
    c |= {
        "scan": {"window": SCAN_WINDOW, "stride": SCAN_STRIDE},
        "labels": raised,
        "background": {"name": bg.name, "proteins": len(bg.calibration), "non_members": len(outside), "raised": len(raised),
                       "uncallable": sorted(label for label, t in raised.items() if t >= NEVER),
                       "presumed_members": bg.presumed, "training_negatives": len(bg.negatives), "margin": MARGIN},
    }  # fmt: skip
    return c, valid_logits
