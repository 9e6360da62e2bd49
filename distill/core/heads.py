"""Classification heads: a softmax-regression (or small MLP) layer over sequence embeddings, stored beside a model.

A head lives next to its model: ``BUNDLE/heads/<task>/{head.safetensors, labels.json}``; ``distill probe`` and
``distill finetune`` write them, the inference layer's torch backend and the ONNX export read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from distill.core.io import atomic_write, atomic_write_json, read_json_object

HEAD_FORMAT = "esm-distill-head"


class HeadError(ValueError):
    """A head that is missing, corrupt, or does not fit the model it is used with."""


class ProbeHead(nn.Module):
    """Standardise, then linear (``hidden=0``) or Linear-GELU-Dropout-Linear; outputs logits.

    ``cosine_scale > 0`` makes the last layer a cosine classifier (NormFace): ``s * cos(z, w_c)``. Class vectors
    of unit length stop frequent classes from growing large weights, which is what many classes with 5-50
    examples each need. ``temperature`` (set by calibration, 1 otherwise) divides the logits; it lives in the
    card, not in the weights, so heads written before calibration existed still load.
    """

    def __init__(self, dim: int, classes: int, hidden: int = 0, cosine_scale: float = 0.0):
        super().__init__()
        self.dim, self.classes, self.hidden, self.cosine_scale = dim, classes, hidden, cosine_scale
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("temperature", torch.ones(()), persistent=False)
        bias = not cosine_scale  # a cosine classifier compares directions only
        if hidden:
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, classes, bias=bias))
        else:
            self.net = nn.Sequential(nn.Linear(dim, classes, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean) * self.scale
        if self.cosine_scale:
            z = F.normalize(self.net[:-1](z), dim=-1)
            logits = self.cosine_scale * F.linear(z, F.normalize(self.net[-1].weight, dim=-1))
        else:
            logits = self.net(z)
        return logits / self.temperature


@dataclass
class Head:
    module: ProbeHead
    labels: list[str]
    card: dict[str, Any]  # task, pooling, dim, hidden, model fingerprint, protocol, metrics

    @property
    def task(self) -> str:
        return self.card["task"]

    @property
    def pooling(self) -> str:
        return self.card["pooling"]

    @property
    def min_probability(self) -> float:
        """The calibrated no-call threshold (0 for heads without calibration: every top label is a call)."""
        return float(self.card.get("calibration", {}).get("threshold", 0.0))

    @torch.no_grad()
    def probabilities(self, features: np.ndarray) -> np.ndarray:
        if features.ndim != 2 or features.shape[1] != self.module.dim:
            raise HeadError(f"the {self.task} head takes {self.module.dim}-dim embeddings, got shape {tuple(features.shape)}")
        return torch.softmax(self.module(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))), -1).numpy()

    def save(self, directory: Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.module.state_dict().items()}
        atomic_write(directory / "head.safetensors", lambda p: save_file(state, str(p)))
        atomic_write_json(directory / "labels.json", {"format": HEAD_FORMAT, "labels": self.labels, **self.card})
        return directory


def load_head(directory: Path, dim: int | None = None) -> Head:
    """Read ``head.safetensors`` + ``labels.json``; ``dim`` (the model's width) is checked when given."""
    directory = Path(directory)
    card_path, weights = directory / "labels.json", directory / "head.safetensors"
    if not card_path.is_file() or not weights.is_file():
        raise HeadError(f"{directory} is not a classification head: needs head.safetensors and labels.json")
    try:
        card = read_json_object(card_path)
    except ValueError as e:
        raise HeadError(str(e)) from e
    if card.get("format") != HEAD_FORMAT or not isinstance(card.get("labels"), list):
        raise HeadError(f"{card_path} is not an esm-distill head card (format {card.get('format')!r})")
    labels = card.pop("labels")
    card.pop("format")
    if dim is not None and card["dim"] != dim:
        raise HeadError(f"{directory}: the head was trained on {card['dim']}-dim embeddings, but the model's width is {dim}")
    module = ProbeHead(card["dim"], len(labels), card.get("hidden", 0), card.get("cosine_scale", 0.0))
    module.temperature.fill_(card.get("calibration", {}).get("temperature", 1.0))
    try:
        state = load_file(str(weights))
        if module.cosine_scale:  # cosine heads written before 2026-11-29 stored a last-layer bias the logits never used
            state.pop(f"net.{len(module.net) - 1}.bias", None)
        module.load_state_dict(state)
    except (SafetensorError, RuntimeError) as e:
        raise HeadError(f"{weights} is corrupt or does not match {card_path} ({len(labels)} labels, dim {card['dim']}): {e}") from e
    return Head(module.eval(), labels, card)


def heads_in(root: Path, dim: int | None = None) -> dict[str, Head]:
    """Every head in a directory of ``<task>/`` head folders (a bundle's ``heads/``, or `distill probe --out`'s), by task."""
    root = Path(root)
    if not root.is_dir():
        return {}
    return {d.name: load_head(d, dim) for d in sorted(root.iterdir()) if (d / "labels.json").is_file()}


def heads_of(bundle: Path, dim: int | None = None) -> dict[str, Head]:
    """Every head stored in a bundle, by task."""
    return heads_in(Path(bundle) / "heads", dim)
