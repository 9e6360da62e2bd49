"""A model spec -> an ESM encoder: what `finetune` trains, `index` and `probe` embed with, the torch backend runs.

Specs are ``distill.core.spec``'s, those whose weights torch loads (``bundle.load_any``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from distill.core.bundle import load_any
from distill.core.model import ESM, weights_sha256
from distill.core.spec import ModelSpec, parse_spec


@dataclass
class Encoder:
    name: str
    model: ESM
    card: dict[str, Any]
    source: str  # the spec as written
    spec: ModelSpec  # ... and as parsed
    heads: list[str] = field(default_factory=list)  # tasks of the heads stored with a bundle

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the weights: what heads, indexes and fine-tuned bundles record as their parent.

        Computed on first use: hashing a 7 GB ESM-1b checkpoint is not free, and plain inference never needs it.
        """
        weights = self.spec.file_fingerprint() or weights_sha256(self.model)
        return f"{weights}+int8" if self.spec.int8 else weights  # same weights, other outputs: caches tell them apart


def load_encoder(spec: str) -> Encoder:
    """Any torch model spec (``bundle.load_any``) with its name, card and the tasks of a bundle's heads."""
    s = parse_spec(spec)
    model, card = load_any(s)
    heads_dir = s.path / "heads" if s.kind == "bundle" else None
    heads = sorted(d.name for d in heads_dir.iterdir() if (d / "labels.json").is_file()) if heads_dir and heads_dir.is_dir() else []
    return Encoder(s.name, model, card, s.text, s, heads)
