"""A model spec -> a trainable ESM encoder, for the commands that train or index (``finetune``, ``index``).

Specs: a student bundle directory; ``random:PRESET[@SEED]`` or ``random:BUNDLE[@SEED]`` (a fresh model of that
size, seed 0 unless given); a fair-esm model name or ``.pt`` checkpoint.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distill.bundle import load_any, parse_random
from distill.io import sha256_file
from distill.model import ESM, PRESETS, ModelConfig, build_student


def tensors_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class Encoder:
    name: str
    model: ESM
    card: dict[str, Any]
    fingerprint: str  # sha256 of the weights: what heads, indexes and fine-tuned bundles record as their parent
    heads: list[str] = field(default_factory=list)  # tasks of the heads stored with a bundle


def load_encoder(spec: str) -> Encoder:
    if spec.startswith("random:"):
        cfg, seed = parse_random(spec)
        model = build_student(cfg, seed=seed)
        preset = next((p for p, v in PRESETS.items() if ModelConfig.preset(p) == cfg), None)
        card = {"name": spec, "model": cfg.to_dict(), "preset": preset, "parameters": model.num_parameters()}
        return Encoder(spec, model, card, tensors_sha256(model))
    model, card = load_any(spec)
    path = Path(spec)
    if path.is_dir():
        heads = sorted(d.name for d in (path / "heads").iterdir() if (d / "labels.json").is_file()) if (path / "heads").is_dir() else []
        return Encoder(path.name, model, card, sha256_file(path / "model.safetensors"), heads)
    fingerprint = sha256_file(path) if path.is_file() else tensors_sha256(model)
    return Encoder(path.stem if path.is_file() else spec, model, card, fingerprint)
