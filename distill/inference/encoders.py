"""A model spec -> an ESM encoder: what `finetune` trains, `index` and `probe` embed with, the torch backend runs.

Specs: a student bundle directory; ``random:PRESET[@SEED]`` or ``random:BUNDLE[@SEED]`` (a fresh model of that
size, seed 0 unless given); a fair-esm model name or ``.pt`` checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from distill.core.bundle import load_any
from distill.core.io import sha256_file
from distill.core.model import ESM, weights_sha256


@dataclass
class Encoder:
    name: str
    model: ESM
    card: dict[str, Any]
    source: str  # the spec it came from
    heads: list[str] = field(default_factory=list)  # tasks of the heads stored with a bundle

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the weights: what heads, indexes and fine-tuned bundles record as their parent.

        Computed on first use: hashing a 7 GB ESM-1b checkpoint is not free, and plain inference never needs it.
        """
        path = Path(self.source)
        if self.source.startswith("random:"):
            return weights_sha256(self.model)
        if path.is_dir():
            return sha256_file(path / "model.safetensors")
        return sha256_file(path) if path.is_file() else weights_sha256(self.model)


def load_encoder(spec: str) -> Encoder:
    """Any torch model spec (``bundle.load_any``) with its name, card and the tasks of a bundle's heads."""
    model, card = load_any(spec)
    path = Path(spec)
    if spec.startswith("random:"):
        return Encoder(spec, model, card, spec)
    if path.is_dir():
        heads = sorted(d.name for d in (path / "heads").iterdir() if (d / "labels.json").is_file()) if (path / "heads").is_dir() else []
        return Encoder(path.name, model, card, spec, heads)
    return Encoder(path.stem if path.is_file() else spec, model, card, spec)
