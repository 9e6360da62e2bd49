"""A head over the parts of a protein: windows scanned, hits merged into domains (a head's hmmscan domain table).

A fine-tuned Pfam head learns from domain-length pieces (median 84 residues); a proteome's proteins are full length
and hold none, one or several domains. One mean embedding of a 600-residue protein is a blend that no training
piece looked like, and the head calls it anyway (issue 37: 2,244 of E. coli's proteins called one family). A head
made for proteomes (``distill finetune --background``, whose card has ``calibration.scan``) is instead applied to
windows of ``window`` residues every ``stride`` (the last one flush with the end; a shorter protein is one window),
each window embedded on its own, as in training. A protein's probability for a label is its best window's; a
domain is a run of overlapping windows whose top label is the same and clears that label's threshold, from the first
window's start to the last one's end. Against the alternatives (one mean embedding of the whole protein; residue
vectors of one full pass pooled over the same windows), measured on the development proteome: docs/results.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from distill.inference.layer import Inference


def spans(length: int, window: int, stride: int) -> np.ndarray:
    """[n, 2] 0-based half-open windows covering ``length`` residues: every ``stride``, the last flush with the end."""
    if length <= window:
        return np.array([[0, length]])
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return np.array([[a, a + window] for a in starts])


@dataclass
class Scan:
    """One protein's windows and the head's probabilities on each."""

    spans: np.ndarray  # [n, 2] 0-based half-open
    probabilities: np.ndarray  # [n, labels]

    @property
    def best(self) -> np.ndarray:
        """[labels]: each label's probability in its best window (what the protein-level call reads)."""
        return self.probabilities.max(0)


@dataclass
class HeadDomain:
    start: int  # 1-based, inclusive
    end: int
    label: str
    score: float  # the best window's probability for the label


def windows(sequences: list[str], window: int, stride: int) -> tuple[list[np.ndarray], list[str]]:
    """Each sequence's spans, and every window's residues in one flat list (sequence by sequence, in order)."""
    cut = [spans(len(s), window, stride) for s in sequences]
    return cut, [s[a:b] for s, sp in zip(sequences, cut, strict=True) for a, b in sp]


def per_sequence(cut: list[np.ndarray], values: np.ndarray) -> list[np.ndarray]:
    """Rows of a flat [windows, ...] array (in ``windows``' order) back to their sequences."""
    return np.split(np.asarray(values), np.cumsum([len(sp) for sp in cut])[:-1]) if cut else []


def scan(inference: Inference, sequences: list[str], task: str, window: int, stride: int) -> list[Scan]:
    """Every protein's windows through ``inference`` (any backend) in one batched pass; results in input order."""
    cut, pieces = windows(sequences, window, stride)
    probs = inference.run(pieces, [task])[1][task] if pieces else np.zeros((0, len(inference.labels[task])), np.float32)
    return [Scan(sp, p) for sp, p in zip(cut, per_sequence(cut, probs), strict=True)]


def segment(s: Scan, labels: list[str], threshold_for: Callable[[str], float]) -> list[HeadDomain]:
    """Runs of overlapping windows with the same top label at or above its threshold -> domains, by start."""
    top, p = s.probabilities.argmax(1), s.probabilities.max(1)
    out: list[HeadDomain] = []
    for (a, b), k, q in zip(s.spans, top, p, strict=True):
        label = labels[k]
        if q < threshold_for(label):
            continue
        last = out[-1] if out else None
        if last is not None and last.label == label and a < last.end:  # overlaps the run it continues
            last.end, last.score = int(b), max(last.score, float(q))
        else:
            out.append(HeadDomain(int(a) + 1, int(b), label, float(q)))
    return out
