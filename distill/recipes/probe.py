"""Frozen-embedding probes: a softmax-regression (or small MLP) head on sequence embeddings.

The protocol, stated in every table we print: embeddings from the frozen model (``mean`` over residues or the
``cls`` token), standardised; labels with fewer than ``min_per_class`` examples dropped (counted); a stratified
random split, or for SCOPe a family-holdout split (test domains come from families absent from training, within
superfamilies seen in training: the remote-homology setting) or a superfamily-holdout split at fold level (TAPE's
remote-homology task: test superfamilies absent from training, folds seen); a validation split taken from the training part
for early stopping; class-weighted cross-entropy; fixed seeds.

Heads and their files: ``distill.core.heads``.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from sklearn.model_selection import train_test_split

from distill.core.calibration import AUTO_FOLDS, calibrate, fold_of
from distill.core.config import (
    CLASS_WEIGHTS,
    DEFAULT_CONFIDENCE,
    DEFAULT_TARGET_PRECISION,
    MIN_FOR_BALANCED,
    NEGATIVE_RATE,
    NEGATIVE_WEIGHT,
)
from distill.core.heads import Head, ProbeHead
from distill.core.labels import LabelledSet
from distill.recipes.outline import adamw, optimizer_step

SPLITS = ("random", "family-holdout", "superfamily-holdout")


def choose_class_weights(asked: str, counts: Counter) -> tuple[str, str]:
    """``auto`` -> ``balanced`` when every class has ``MIN_FOR_BALANCED`` training examples, else ``none``: inverse-size
    weights on classes with one or two examples trade most of the top-1 accuracy for macro recall. Returns (used, why)."""
    if asked not in CLASS_WEIGHTS:
        raise ValueError(f"--class-weights must be one of {', '.join(CLASS_WEIGHTS)}, got {asked!r}")
    if asked != "auto":
        return asked, f"class weights {asked} (as asked)"
    small = sum(1 for n in counts.values() if n < MIN_FOR_BALANCED)
    if small:
        return "none", (f"class weights none (auto: {small} of {len(counts)} classes have fewer than {MIN_FOR_BALANCED} training "
                        "examples; balanced weights would trade top-1 accuracy for macro recall)")  # fmt: skip
    return "balanced", f"class weights balanced (auto: every class has at least {MIN_FOR_BALANCED} training examples)"


# ---- splits ---------------------------------------------------------------------------------------


@dataclass
class Split:
    train: np.ndarray
    test: np.ndarray
    notes: list[str] = field(default_factory=list)  # what was dropped or held back, and why


def drop_rare(ds: LabelledSet, min_per_class: int) -> tuple[np.ndarray, list[str]]:
    counts = ds.counts()
    rare = {label for label, n in counts.items() if n < min_per_class}
    keep = np.array([i for i, label in enumerate(ds.labels) if label not in rare], dtype=np.int64)
    notes = []
    if rare:
        notes.append(f"dropped {len(rare)} labels with fewer than {min_per_class} examples ({len(ds) - len(keep)} sequences)")
    if len({ds.labels[i] for i in keep}) < 2:
        raise ValueError(
            f"fewer than 2 classes have at least {min_per_class} examples ({len(counts)} labels in the data); lower --min-per-class"
        )
    return keep, notes


# A held-out split names the level whose groups go wholly to test: SCOPe families within seen superfamilies, or
# (TAPE's remote-homology fold task: labels at --level fold) superfamilies within seen folds.
HOLDOUT_LEVELS = {"family-holdout": 4, "superfamily-holdout": 3}


def make_split(ds: LabelledSet, kind: str, seed: int, test_fraction: float = 0.2, min_per_class: int = 10) -> Split:
    if kind not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {kind!r}")
    keep, notes = drop_rare(ds, min_per_class)
    labels = np.array(ds.labels)[keep]
    if kind == "random":
        train, test = train_test_split(keep, test_size=test_fraction, stratify=labels, random_state=seed)
        return Split(np.sort(train), np.sort(test), notes)
    groups = holdout_groups(ds, kind)[keep]
    rng = np.random.default_rng(seed)
    test_mask = np.zeros(len(keep), dtype=bool)
    single = 0
    for label in sorted(set(labels)):
        members = np.flatnonzero(labels == label)
        held_groups = sorted(set(groups[members]))
        if len(held_groups) < 2:
            single += 1
            continue
        rng.shuffle(held_groups)
        held = 0
        for group in held_groups[:-1]:  # at least one group stays in training
            if held >= test_fraction * len(members):
                break
            in_group = members[groups[members] == group]
            test_mask[in_group] = True
            held += len(in_group)
    unit = kind.split("-")[0]
    notes.append(f"{kind}: {single} classes with a single {unit} are training-only")
    return Split(keep[~test_mask], keep[test_mask], notes)


def holdout_groups(ds: LabelledSet, kind: str) -> np.ndarray:
    """The group each sequence is held out with: its SCOPe sccs cut at the split's level, which must lie below the label."""
    depth = HOLDOUT_LEVELS[kind]
    if kind == "family-holdout" and all(g == label for g, label in zip(ds.groups, ds.labels, strict=True)):
        raise ValueError("--split family-holdout needs family labels below the class (SCOPe sccs); these data have none")
    groups = np.array([".".join(g.split(".")[:depth]) for g in ds.groups])
    if kind == "superfamily-holdout" and any(
        g.count(".") != 3 or label.count(".") >= 2 for g, label in zip(ds.groups, ds.labels, strict=True)
    ):
        raise ValueError("--split superfamily-holdout needs SCOPe sccs labels cut above the superfamily: use --task scope --level fold")
    return groups


# ---- training -------------------------------------------------------------------------------------


def train_head(
    x: np.ndarray,
    y: np.ndarray,
    classes: int,
    hidden: int = 0,
    seed: int = 0,
    valid_fraction: float = 0.1,
    max_epochs: int = 200,
    patience: int = 10,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    class_weights: str = "balanced",
    valid: tuple[np.ndarray, np.ndarray] | None = None,
    cosine_scale: float = 0.0,
    negatives: np.ndarray | None = None,
) -> tuple[ProbeHead, dict[str, Any]]:
    """Cross-entropy (``balanced`` or ``none`` class weights), AdamW, early stopping on validation loss: on
    ``valid`` (features, labels) when given, else on ``valid_fraction`` of the training data. Returns the best head.

    ``negatives`` (features of residue-shuffled sequences) add outlier exposure as fine-tuning has it: each step
    ``NEGATIVE_RATE`` of its rows are negatives pulled towards the uniform distribution, so a shuffled member, whose
    composition is its family's, stops getting its family's confident call."""
    torch.manual_seed(seed)
    idx = np.arange(len(y))
    counts = np.bincount(y, minlength=classes)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(y.astype(np.int64))
    if valid is None:
        can_stratify = counts[counts > 0].min() >= 2 and int(valid_fraction * len(y)) >= (counts > 0).sum()
        tr, va = train_test_split(idx, test_size=valid_fraction, stratify=y if can_stratify else None, random_state=seed)
        xv, yv = xt[va], yt[va]
    else:
        tr, va = idx, np.array([], dtype=np.int64)
        xv, yv = torch.from_numpy(np.ascontiguousarray(valid[0], dtype=np.float32)), torch.from_numpy(valid[1].astype(np.int64))
    head = ProbeHead(x.shape[1], classes, hidden, cosine_scale)
    head.mean.copy_(xt[tr].mean(0))
    head.scale.copy_(1.0 / xt[tr].std(0).clamp_min(1e-6))
    weight = torch.from_numpy(len(y) / (classes * np.maximum(counts, 1))).float() if class_weights == "balanced" else None
    opt = adamw(head.parameters(), lr, weight_decay)  # the outline's decay groups; a constant rate, no clipping
    gen = torch.Generator().manual_seed(seed)
    best, best_loss, bad, epochs = copy.deepcopy(head.state_dict()), math.inf, 0, 0
    nt = None if negatives is None or not len(negatives) else torch.from_numpy(np.ascontiguousarray(negatives, dtype=np.float32))
    per_row = NEGATIVE_RATE / (1 - NEGATIVE_RATE)  # negatives per labelled row
    for epochs in range(1, max_epochs + 1):  # noqa: B007 (the count is reported)
        head.train()
        for b in torch.from_numpy(tr)[torch.randperm(len(tr), generator=gen)].split(batch_size):
            loss = F.cross_entropy(head(xt[b]), yt[b], weight=weight)
            if nt is not None:
                z = head(nt[torch.randint(len(nt), (max(1, round(len(b) * per_row)),), generator=gen)])
                loss = loss + NEGATIVE_WEIGHT * per_row * (torch.logsumexp(z, -1) - z.mean(-1)).mean()
            loss.backward()
            optimizer_step(head.parameters(), opt, None)
        head.eval()
        with torch.no_grad():
            val_loss = F.cross_entropy(head(xv), yv, weight=weight).item()
        if val_loss < best_loss - 1e-4:
            best, best_loss, bad = copy.deepcopy(head.state_dict()), val_loss, 0
        else:
            bad += 1
            if bad >= patience:
                break
    head.load_state_dict(best)
    return head.eval(), {"epochs": epochs, "best_valid_loss": best_loss, "n_valid": len(yv)}


# ---- metrics --------------------------------------------------------------------------------------

METRIC_COLUMNS = [
    "accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
]


def classification_metrics(y_true: list[str] | np.ndarray, y_pred: list[str] | np.ndarray) -> dict[str, float]:
    """scikit-learn's accuracy and precision/recall/F1, macro- and weighted-averaged (undefined terms count 0)."""
    out = {"accuracy": float(accuracy_score(y_true, y_pred))}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=avg, zero_division=0)
        out |= {f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)}
    return out


@dataclass
class ProbeResult:
    head: Head
    metrics: dict[str, Any]
    y_true: list[str]
    y_pred: list[str]
    test_index: np.ndarray
    notes: list[str]


def run_probe(
    features: np.ndarray,
    ds: LabelledSet,
    task: str,
    split: Split,
    protocol: dict[str, Any],
    hidden: int = 0,
    seed: int = 0,
    test_features: np.ndarray | None = None,
    test_ds: LabelledSet | None = None,
    negative_features: np.ndarray | None = None,
    *,
    class_weights: str = "auto",
    valid: tuple[np.ndarray, LabelledSet] | None = None,
    negative_index: np.ndarray | None = None,
    calibration: tuple[float, float] | None = None,
) -> ProbeResult:
    """Train a head on ``split.train`` and score it on ``split.test`` (or on a separate test set).

    ``valid`` (features, labelled set) replaces the 10% early-stopping part of the training data. With
    ``negative_features`` (embeddings of residue-shuffled copies of the training sequences at ``negative_index`` of
    ``ds``) the head learns "none of these" from them and gets its temperature and no-call threshold from out-of-fold
    scores (``calibrate_out_of_fold``) for ``calibration`` (target precision, confidence; None: the defaults).
    """
    labels = sorted({ds.labels[i] for i in split.train})
    if len(labels) < 2:
        raise ValueError(f"the {task} training split has {len(labels)} class; a classifier needs at least 2")
    index = {label: i for i, label in enumerate(labels)}
    y = np.array([index[ds.labels[i]] for i in split.train])
    notes = list(split.notes)
    weights, why = choose_class_weights(class_weights, Counter(ds.labels[i] for i in split.train))
    notes.append(why)
    valid_xy = None
    if valid is not None:
        known = [i for i, label in enumerate(valid[1].labels) if label in index]
        if not known:
            raise ValueError(f"none of the --valid labels occur in the {task} training data")
        if len(known) < len(valid[1]):
            notes.append(f"{len(valid[1]) - len(known)} validation sequences have labels absent from training; not used")
        valid_xy = (valid[0][known], np.array([index[valid[1].labels[i]] for i in known]))
    module, fit_info = train_head(features[split.train], y, len(labels), hidden, seed, class_weights=weights, valid=valid_xy,
                                  negatives=negative_features)  # fmt: skip
    if test_ds is None:
        test_x, truth, test_index = features[split.test], [ds.labels[i] for i in split.test], split.test
    else:
        known = np.array([i for i, label in enumerate(test_ds.labels) if label in index], dtype=np.int64)
        if len(known) < len(test_ds):
            notes.append(f"{len(test_ds) - len(known)} test sequences have labels absent from training; not scored")
        test_x, truth, test_index = test_features[known], [test_ds.labels[i] for i in known], known
    if len(truth) == 0:
        raise ValueError(f"no test examples for {task} after the split; use more data or a lower --min-per-class")
    card = {"task": task, "dim": module.dim, "hidden": hidden, "protocol": protocol | {"class_weights": weights}}
    head = Head(module, labels, card)
    if negative_features is not None:
        source = np.searchsorted(split.train, negative_index) if negative_index is not None else None
        target, confidence = calibration or (DEFAULT_TARGET_PRECISION, DEFAULT_CONFIDENCE)
        c = calibrate_out_of_fold(features[split.train], y, len(labels), negative_features, source, hidden=hidden, seed=seed,
                                  class_weights=weights, target=target, confidence=confidence)  # fmt: skip
        head.card["calibration"] = c
        module.temperature.fill_(c["temperature"])
    pred = [labels[i] for i in head.probabilities(test_x).argmax(1)]
    metrics = classification_metrics(truth, pred) | {
        "classes": len(labels),
        "n_train": len(split.train),
        "n_test": len(truth),
        "head_epochs": fit_info["epochs"],
        "class_weights": weights,
    }
    head.card["metrics"] = metrics
    return ProbeResult(head, metrics, truth, pred, test_index, notes)


def logits_of(head: ProbeHead, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return head(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


def calibrate_out_of_fold(x: np.ndarray, y: np.ndarray, classes: int, negatives: np.ndarray, source: np.ndarray | None, *,
                          hidden: int = 0, seed: int = 0, class_weights: str = "none", folds: int = AUTO_FOLDS,
                          target: float = DEFAULT_TARGET_PRECISION, confidence: float = DEFAULT_CONFIDENCE) -> dict[str, Any]:  # fmt: skip
    """A probe head's temperature and no-call threshold from every training example, not a 10% part.

    ``folds`` heads, each trained as the head is on all folds but one (with the negatives shuffled from those folds),
    score their left-out fold and the negatives shuffled from it (``source``: the row of ``x`` each negative came
    from; None spreads them over the folds). The threshold's precision is a one-sided lower bound at ``confidence`` (distill.core.calibration): with a few dozen
    examples a class a point precision of 1.0 on a validation part is luck as often as skill. Linear heads train in
    seconds, so unlike a fine-tune this costs little at any size.
    """
    which = fold_of(y, folds, seed)
    neg_fold = which[source] if source is not None else np.arange(len(negatives)) % folds
    logits = np.zeros((len(y), classes), dtype=np.float32)
    neg_logits = np.zeros((len(negatives), classes), dtype=np.float32)
    for k in range(folds):
        rest = which != k
        fold_head, _ = train_head(x[rest], y[rest], classes, hidden, seed, class_weights=class_weights, negatives=negatives[neg_fold != k])
        logits[which == k] = logits_of(fold_head, x[which == k])
        neg_logits[neg_fold == k] = logits_of(fold_head, negatives[neg_fold == k])
    c = calibrate(logits, y, neg_logits, target, confidence=confidence)
    return c | {"pool": f"out-of-fold ({folds} folds)"}


def label_counts_line(ds: LabelledSet) -> str:
    c = Counter(ds.labels)
    return f"{len(ds)} sequences, {len(c)} labels (largest {c.most_common(1)[0][1]}, smallest {min(c.values())})"
