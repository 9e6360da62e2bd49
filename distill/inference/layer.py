"""The inference layer: sequences in, embeddings and head probabilities out, in input order, over any backend.

validate and apply the long-sequence policy (``sequences.prepare``) -> tokenise -> token-budget batches,
length-sorted (``tokens.token_budget_groups``) -> ``backend.forward`` -> pieces back to their sequences (windows
averaged) -> input order. A backend implements only ``forward`` on one padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from distill.core import tokens
from distill.core.config import INFERENCE_MAX_TOKENS
from distill.inference.sequences import prepare


@dataclass
class Outputs:
    """What a backend returns for one padded batch of ``n`` rows and ``width`` tokens."""

    mean: np.ndarray  # [n, dim]: mean over real residues
    probabilities: dict[str, np.ndarray]  # per asked task: [n, n_labels]
    cls: np.ndarray | None = None  # [n, dim]: the <cls> token's last-layer vector
    residues: np.ndarray | None = None  # [n, width, dim], BOS/EOS/pad included


class Backend(Protocol):
    name: str
    dim: int
    labels: dict[str, list[str]]  # head task -> label names
    thresholds: dict[str, float]  # head task -> calibrated no-call threshold
    calibrations: dict[str, dict[str, Any]]  # head task -> its card's calibration (per-label thresholds, scan windows)
    metadata: dict[str, Any]
    provider: str
    max_tokens: int | None  # the backend's own cap on one batch (a service's per-request limit), None: none
    max_rows: int | None

    def forward(self, batch: np.ndarray, sequences: list[str], tasks: list[str], residues: bool, cls: bool) -> Outputs: ...


@dataclass
class Embedding:
    sequence: np.ndarray  # [dim]: mean over real residues (over windows: the mean of the windows' means)
    residues: np.ndarray | None  # [length, dim] without BOS/EOS, when asked for (windows: overlaps averaged)
    cropped: bool  # True when the sequence was over 1,022 residues (cropped or windowed, as asked)
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)  # per head task: [n_labels]
    cls: np.ndarray | None = None  # [dim]: the <cls> token's last-layer vector, when asked for


def raised_thresholds(calibration: dict[str, Any]) -> dict[str, float]:
    """A head card's calibration -> the labels whose own threshold a background proteome raised (label -> threshold)."""
    return calibration.get("labels", {})


def scan_settings(calibration: dict[str, Any]) -> tuple[int, int] | None:
    """A head card's calibration -> (window, stride) when the head scans whole proteins (distill.inference.scan)."""
    s = calibration.get("scan")
    return (int(s["window"]), int(s["stride"])) if s else None


def heads_asked(labels: dict[str, list[str]], tasks: list[str] | None) -> list[str]:
    """The asked-for head tasks (default: all of them); an unknown one is an error naming what exists."""
    tasks = list(labels) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in labels]
    if unknown:
        raise ValueError(f"no {', '.join(unknown)} head in this model (heads: {', '.join(labels) or 'none'}); add one with `distill probe`")
    return tasks


def top_k(probabilities: np.ndarray, labels: list[str], k: int) -> list[tuple[str, float]]:
    """The k most probable labels, best first (ties broken by label order)."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(labels[i], float(probabilities[i])) for i in order]


def stack(embeddings: list[Embedding], tasks: list[str], dim: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """List of ``Embedding`` -> ([n, dim] matrix, task -> [n, labels] matrix)."""
    vectors = np.stack([e.sequence for e in embeddings]) if embeddings else np.zeros((0, dim), np.float32)
    return vectors, {t: np.stack([e.probabilities[t] for e in embeddings]) for t in tasks}


class Inference:
    """A backend plus the rules every caller shares; ``resolve(spec)`` builds one from any model spec."""

    def __init__(self, backend: Backend, max_tokens: int = INFERENCE_MAX_TOKENS):
        self.backend = backend
        self.max_tokens = min(max_tokens, backend.max_tokens or max_tokens)
        self.name, self.dim, self.labels = backend.name, backend.dim, backend.labels
        self.thresholds, self.metadata = backend.thresholds, backend.metadata
        self.calibrations = getattr(backend, "calibrations", {})

    def threshold_for(self, task: str, label: str) -> float:
        """A label's calibrated threshold: its own where a background proteome raised it, else the head's."""
        return float(raised_thresholds(self.calibrations.get(task, {})).get(label, self.thresholds.get(task, 0.0)))

    def scan_of(self, task: str) -> tuple[int, int] | None:
        return scan_settings(self.calibrations.get(task, {}))

    @property
    def provider(self) -> str:
        return self.backend.provider

    def embed(
        self, sequences: list[str], long: str = "error", per_residue: bool = False, tasks: list[str] | None = None, cls: bool = False
    ) -> list[Embedding]:
        """Embeddings in input order; ``tasks`` (default: every head) adds head probabilities."""
        tasks = heads_asked(self.labels, tasks)
        p = prepare(sequences, long)
        mean, cls_vec, residues, probs = self._forward(p.pieces, tasks, per_residue, cls)
        by_owner: list[list[int]] = [[] for _ in p.sequences]
        for j, i in enumerate(p.owner):
            by_owner[i].append(j)
        out = []
        for i, js in enumerate(by_owner):
            res = None
            if per_residue:
                res = (
                    residues[js[0]] if len(js) == 1 else _stitch([residues[j] for j in js], [p.starts[j] for j in js], len(p.sequences[i]))
                )
            out.append(
                Embedding(
                    mean[js].mean(0),
                    res,
                    p.long[i],
                    {t: probs[t][js].mean(0) for t in tasks},
                    cls_vec[js].mean(0) if cls else None,
                )
            )
        return out

    def run(self, sequences: list[str], tasks: list[str], long: str = "error") -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``embed`` as matrices: ([n, dim], task -> [n, labels])."""
        return stack(self.embed(sequences, long, tasks=tasks), tasks, self.dim)

    def _forward(self, pieces: list[str], tasks: list[str], per_residue: bool, cls: bool) -> tuple:
        """Every piece through the backend in token-budget batches; results in piece order."""
        ids = [tokens.encode(x) for x in pieces]
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        n = len(ids)
        mean = np.zeros((n, self.dim), np.float32)
        cls_vec = np.zeros((n, self.dim), np.float32) if cls else None
        residues: list[np.ndarray | None] = [None] * n
        probs = {t: np.zeros((n, len(self.labels[t])), np.float32) for t in tasks}
        rows = self.backend.max_rows or n or 1
        groups = [
            g[k : k + rows] for g in tokens.token_budget_groups(lengths, np.arange(n), self.max_tokens) for k in range(0, len(g), rows)
        ]
        for g in groups:
            o = self.backend.forward(tokens.pad_batch([ids[i] for i in g]), [pieces[i] for i in g], tasks, per_residue, cls)
            mean[g] = o.mean
            for t in tasks:
                probs[t][g] = o.probabilities[t]
            if cls:
                cls_vec[g] = o.cls
            if per_residue:
                for row, i in enumerate(g):
                    residues[i] = np.array(o.residues[row, 1 : lengths[i] + 1], dtype=np.float32)
        return mean, cls_vec, residues, probs


def _stitch(parts: list[np.ndarray], starts: list[int], length: int) -> np.ndarray:
    """Per-residue matrices of overlapping windows -> one [length, dim] matrix, overlaps averaged."""
    total = np.zeros((length, parts[0].shape[1]), np.float32)
    count = np.zeros((length, 1), np.float32)
    for part, start in zip(parts, starts, strict=True):
        total[start : start + len(part)] += part
        count[start : start + len(part)] += 1
    return total / count
