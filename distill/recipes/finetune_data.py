"""Labelled data for ``distill finetune``: the label set, a stratified validation part, out-of-set negatives, and
each step's keyed crops with their negatives (shuffled copies, background pieces, scan-window context); with a task
teacher, its soft targets for the training sequences."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import track

from distill.core import data
from distill.core.config import SCAN_WINDOW, FinetuneConfig
from distill.core.fasta import read_proteome
from distill.core.heads import heads_of
from distill.core.labels import LabelledSet, read_labelled
from distill.inference.embeddings import embed
from distill.inference.encoders import load_encoder


@dataclass
class Background:
    """A whole proteome of mostly non-members (``--background``), split in two halves by protein (keyed by the seed):
    crops of one half's non-members are training negatives; the other half calibrates, never trained on."""

    name: str
    negatives: list[str]  # training half, presumed members left out
    calibration: list[str]  # calibration half, all proteins
    members: list[set[str]]  # per calibration protein, the labels it is presumed a member of
    presumed: int  # proteins of the whole background presumed members of some label


def read_background(path: str, train: LabelledSet, labels: list[str], seed: int, quiet: bool = False) -> Background:
    """The proteome, halved, with each protein's presumed memberships (distill.inference.members: alignment to the
    training sequences at E <= 1e-5, a rule that does not use the model being trained)."""
    from distill.inference.align import _pyopal
    from distill.inference.members import presumed_members

    _pyopal()  # the member rule aligns: a missing pyopal is said now, before any training

    name, proteins = read_proteome(Path(path))
    if len(proteins) < 2:
        raise ValueError(f"--background {path} holds {len(proteins)} protein: it needs two or more (one half trains, the other calibrates)")
    keep = [i for i, label in enumerate(train.labels) if label in set(labels)]
    bar = partial(track, description=f"{name}: aligning to the training sequences", disable=quiet, console=Console(stderr=True))
    members = presumed_members([train.sequences[i] for i in keep], [train.labels[i] for i in keep], proteins, progress=bar)
    half = np.random.default_rng([seed, 13]).permutation(len(proteins)) % 2 == 1
    negatives = [p for p, m, h in zip(proteins, members, half, strict=True) if not h and not m]
    calibration = [i for i in range(len(proteins)) if half[i]]
    return Background(name, negatives, [proteins[i] for i in calibration], [members[i] for i in calibration],
                      sum(bool(m) for m in members))  # fmt: skip


@dataclass
class Data:
    train: LabelledSet
    valid: LabelledSet
    labels: list[str]
    y_train: np.ndarray
    y_valid: np.ndarray
    outside: list[str]  # sequences of classes outside the label set: negatives for the no-call
    background: Background | None = None
    notes: list[str] = field(default_factory=list)
    order: np.ndarray | None = None  # each training then validation sequence's position in the input files


def stratified_valid(ds: LabelledSet, fraction: float, seed: int) -> np.ndarray:
    """Validation mask: ``floor(fraction * n)`` of each class (keyed shuffle), at least one left for training."""
    mask = np.zeros(len(ds), dtype=bool)
    labels = np.array(ds.labels)
    for k, label in enumerate(sorted(set(ds.labels))):
        members = np.flatnonzero(labels == label)
        take = min(int(fraction * len(members)), len(members) - 1)
        if take > 0:
            mask[np.random.default_rng([seed, k, 11]).permutation(members)[:take]] = True
    return mask


def setup_data(cfg: FinetuneConfig) -> Data:
    labels_file = Path(cfg.labels) if cfg.labels else None
    ds = read_labelled(cfg.data, cfg.rule(), labels_file)
    if cfg.valid:
        train, valid = ds, read_labelled(cfg.valid, cfg.rule(), labels_file)
        where = [np.arange(len(train)), len(train) + np.arange(len(valid))]
    else:
        is_valid = stratified_valid(ds, cfg.valid_fraction, cfg.seed)
        where = [np.flatnonzero(~is_valid), np.flatnonzero(is_valid)]
        train, valid = ds.subset(where[0]), ds.subset(where[1])
    counts = train.counts()
    kept = sorted(label for label, n in counts.items() if n >= cfg.min_per_class)
    notes = []
    if len(counts) < 2:
        raise ValueError(f"{', '.join(cfg.data)}: only one class ({next(iter(counts))}); a classifier needs at least 2")
    if len(kept) < 2:
        raise ValueError(f"fewer than 2 classes have {cfg.min_per_class} training sequences; lower --min-per-class or add data")
    unknown = sorted(set(valid.labels) - set(counts))
    if cfg.valid and unknown:
        raise ValueError(
            f"--valid has labels absent from the training data: {', '.join(unknown[:5])}" + (" ..." if len(unknown) > 5 else "")
        )
    index = {label: i for i, label in enumerate(kept)}
    outside = [s for s, label in zip(train.sequences, train.labels, strict=True) if label not in index]
    outside += [s for s, label in zip(valid.sequences, valid.labels, strict=True) if label not in index]
    if len(kept) < len(counts):
        notes.append(f"{len(counts) - len(kept)} classes with fewer than {cfg.min_per_class} training sequences left the label set; "
                     f"their {len(outside)} sequences are no-call negatives")  # fmt: skip
    known = [np.array([label in index for label in part.labels], dtype=bool) for part in (train, valid)]
    train, valid = (part.subset(np.flatnonzero(k)) for part, k in zip((train, valid), known, strict=True))
    if len(valid) == 0:
        raise ValueError("no validation sequences: give --valid FILE or raise --valid-fraction (classes need 1/fraction members)")
    y = [np.array([index[label] for label in s.labels], dtype=np.int64) for s in (train, valid)]
    background = read_background(cfg.background, train, kept, cfg.seed, cfg.quiet) if cfg.background else None
    order = np.concatenate([w[k] for w, k in zip(where, known, strict=True)])
    return Data(train, valid, kept, y[0], y[1], outside, background, notes, order)


def in_window(piece: np.ndarray, background: list[np.ndarray], rng: np.random.Generator, window: int = SCAN_WINDOW) -> np.ndarray:
    """A labelled piece as a scanning window sees it: a random ``window``-long part of a longer domain, or a shorter
    one at a random place between flanks cut from a background protein (a window of a real protein holds a domain
    and what surrounds it; trained on bare domains only, a head misreads such windows: docs/results.md)."""
    if len(piece) >= window:
        start = int(rng.integers(0, len(piece) - window + 1))
        return piece[start : start + window]
    protein = background[int(rng.integers(len(background)))]
    n = min(window - len(piece), len(protein))
    start = int(rng.integers(0, len(protein) - n + 1))
    flank, left = protein[start : start + n], int(rng.integers(0, n + 1))
    return np.concatenate([flank[:left], piece, flank[left:]])


def step_examples(
    seqs: list[np.ndarray], y: np.ndarray, step: np.ndarray, epoch: int, cfg: FinetuneConfig, background: list[np.ndarray] | None = None
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The step's keyed random crops, plus negatives (label -1): residue-shuffled copies of a ``negative_rate`` share
    of them and, with a background proteome, crops of its proteins for a ``background_rate`` share, each as long as a
    crop of the step (real non-member pieces of the lengths the head sees). With a background, a ``context_rate``
    share of the crops are first put in a scan window (``in_window``).

    Returns (crops, labels, training-set row of each example, for the teacher's logits; negatives reuse a row).
    """
    crops = [data.crop(seqs[i], np.random.default_rng([cfg.seed, epoch, int(i), 5])) for i in step]
    for k, i in enumerate(step if background else []):
        rng = np.random.default_rng([cfg.seed, epoch, int(i), 21])
        if rng.random() < cfg.context_rate:
            crops[k] = in_window(crops[k], background, rng)
    n_neg = int(round(cfg.negative_rate * len(step)))
    negs = [np.random.default_rng([cfg.seed, epoch, int(i), 9]).permutation(crops[k]) for k, i in enumerate(step[:n_neg])]
    n_bg = int(round(cfg.background_rate * len(step))) if background else 0
    for k in range(n_bg):
        rng = np.random.default_rng([cfg.seed, epoch, int(step[0]), k, 17])
        protein = background[int(rng.integers(len(background)))]
        n = min(len(crops[k % len(crops)]), len(protein))
        start = int(rng.integers(0, len(protein) - n + 1))
        negs.append(protein[start : start + n])
    rows = np.r_[step, step[:n_neg], np.resize(step, n_bg)]
    return crops + negs, np.r_[y[step], -np.ones(n_neg + n_bg, dtype=np.int64)], rows


def teacher_logits(cfg: FinetuneConfig, d: Data, device: torch.device) -> torch.Tensor | None:
    """The task teacher's logits for every training sequence (leading crop), in the student's label order."""
    if cfg.teacher is None or cfg.lam == 0:
        return None
    teacher = load_encoder(cfg.teacher)
    head = heads_of(Path(cfg.teacher), teacher.model.cfg.dim).get(cfg.task) if Path(cfg.teacher).is_dir() else None
    if head is None:
        raise ValueError(f"--teacher {cfg.teacher} has no {cfg.task} head; fine-tune it first (distill finetune ... --task {cfg.task})")
    missing = sorted(set(d.labels) - set(head.labels))
    if missing:
        raise ValueError(f"--teacher's {cfg.task} head lacks {len(missing)} of the student's labels (first: {missing[0]})")
    feats = embed(teacher.model.to(device), d.train.sequences, head.pooling, cfg.max_tokens, str(device), teacher.name, cfg.quiet)
    with torch.no_grad():
        logits = head.module(torch.from_numpy(feats))
    return logits[:, [head.labels.index(label) for label in d.labels]]
