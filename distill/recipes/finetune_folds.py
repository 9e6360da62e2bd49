"""K-fold calibration of a fine-tuned head: every labelled example scored once by a model that never trained on it.

A head fine-tuned on a few dozen sequences a class has a validation part of a few sequences a class, where one
error already breaks precision 0.99 and a point precision of 1.0 is luck as often as skill. So, for small data sets,
the labelled sequences (training and validation parts together) are cut into ``k`` stratified folds; the recipe is
run ``k`` more times, each time on all folds but one (with its own validation part for early stopping), and scores
the left-out fold and residue-shuffled copies of it with both kinds of model a fine-tune can keep: its probe
baseline and its best fine-tuning epoch. Those scores decide which kind the bundle keeps
(distill.recipes.finetune_fallback), and the kept kind's set its temperature and no-call threshold
(cross-validation's estimate of how the final head scores new sequences), with the confidence rule of
distill.core.calibration.

Each fold is a run directory of its own (OUT/folds/K), resumable like the main run; its scores are written to
OUT/folds/K/scores.npz when it ends, so a resumed fine-tune skips finished folds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from distill.core.calibration import AUTO_FOLDS, fold_of, shuffled
from distill.core.config import FinetuneConfig
from distill.core.labels import LabelledSet
from distill.recipes.finetune_data import Data, stratified_valid

AUTO_MAX_SEQUENCES = 2000  # auto: AUTO_FOLDS folds up to this many labelled sequences, the validation part above

# (config, data) -> {kind: a function scoring sequences with the fold's model of that kind}, or None when stopped
TrainFold = Callable[[FinetuneConfig, Data], dict[str, Callable[[list[str]], np.ndarray]] | None]


def folds_for(cfg: FinetuneConfig, d: Data) -> int:
    """How many folds calibrate this run: ``cfg.folds``, or with ``None`` (auto) 5 for small data sets, 0 otherwise."""
    if cfg.folds is not None:
        return cfg.folds
    return AUTO_FOLDS if d.background is None and len(d.train) + len(d.valid) <= AUTO_MAX_SEQUENCES else 0


def joined(d: Data) -> tuple[LabelledSet, np.ndarray]:
    """Training and validation parts as one set, with their label indices."""
    parts = (d.train, d.valid)
    ds = LabelledSet(*([x for part in parts for x in getattr(part, f)] for f in ("ids", "sequences", "labels", "groups", "sources")))
    return ds, np.r_[d.y_train, d.y_valid]


def fold_data(d: Data, ds: LabelledSet, y: np.ndarray, train_idx: np.ndarray, cfg: FinetuneConfig) -> Data:
    """The fold's own Data: its training part cut into training and validation as the main run's was."""
    part = ds.subset(train_idx)
    is_valid = stratified_valid(part, cfg.valid_fraction, cfg.seed)
    if not is_valid.any():  # classes too small for the fraction: one member of each class that can spare one
        is_valid = _one_per_class(part.labels, cfg.seed)
    pick = lambda mask: (part.subset(np.flatnonzero(mask)), y[train_idx][mask])  # noqa: E731
    (train, y_train), (valid, y_valid) = pick(~is_valid), pick(is_valid)
    return Data(train, valid, d.labels, y_train, y_valid, d.outside, None, [])


def out_of_fold(cfg: FinetuneConfig, d: Data, folds: int, train_fold: TrainFold) -> dict[str, dict[str, np.ndarray]] | None:
    """For each kind of model ``train_fold`` scores with: out-of-fold logits of every labelled sequence (``logits``,
    ``y``) and of negatives (``negative_logits``: shuffled copies of each fold's sequences, and the out-of-set sequences
    spread over the folds) and ``folds``; None if stopped."""
    ds, y = joined(d)
    if folds < 2 or folds > len(y):
        raise ValueError(
            f"--folds must be 0 (calibrate on the validation part) or between 2 and the {len(y)} labelled sequences, got {folds}"
        )
    which = fold_of(y, folds, cfg.seed)
    parts = []
    for k in range(folds):
        out = Path(cfg.out) / "folds" / str(k)
        if not _finished(out / "scores.npz"):
            held = np.flatnonzero(which == k)
            scorers = train_fold(replace(cfg, out=str(out), folds=0, quiet=True), fold_data(d, ds, y, np.flatnonzero(which != k), cfg))
            if scorers is None:
                return None
            seqs = [ds.sequences[i] for i in held]
            negatives = shuffled(seqs, cfg.seed + 1000 * k) + d.outside[k::folds]
            scores = {}
            for kind, score in scorers.items():  # one pass per kind over the fold's sequences and their negatives
                z = score(seqs + negatives)
                scores |= {kind: z[: len(seqs)], f"negative_{kind}": z[len(seqs) :]}
            np.savez(out / "scores.npz", held=held, **scores)
        parts.append(dict(np.load(out / "scores.npz")))
    order = np.argsort(np.concatenate([p["held"] for p in parts]))
    kinds = [key for key in parts[0] if key != "held" and not key.startswith("negative_")]
    join = lambda key: np.concatenate([p[key] for p in parts])  # noqa: E731
    return {kind: {"logits": join(kind)[order], "y": y, "negative_logits": join(f"negative_{kind}"), "folds": folds} for kind in kinds}


def _finished(scores: Path) -> bool:
    """A fold's scores exist in this version's form (one fold model per kind; older runs scored one kind: redone)."""
    if not scores.exists():
        return False
    with np.load(scores) as f:
        return "logits" not in f.files


def _one_per_class(labels: list[str], seed: int) -> np.ndarray:
    """A mask with one keyed member of each class that has two or more."""
    mask, labels_arr = np.zeros(len(labels), dtype=bool), np.array(labels)
    for k, label in enumerate(sorted(set(labels))):
        members = np.flatnonzero(labels_arr == label)
        if len(members) >= 2:
            mask[np.random.default_rng([seed, k, 13]).choice(members)] = True
    return mask
