"""Frozen per-sequence features for probing: any model spec -> [N, dim] float32, cached on disk.

Models are ``distill.core.spec``'s specs that torch loads, plus ``composition`` (25 amino-acid frequencies: what does
a Transformer add?) and ``random:`` baselines (what does training add?).

Embeddings are computed once per (model weights, sequences, pooling) and cached as ``.npy`` (ESM-1b on a CPU
is slow: never twice). Sequences over 1,022 residues are embedded on their leading 1,022 (counted, reported).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distill.core import tokens
from distill.core.config import POOLINGS, TRAIN_MAX_TOKENS
from distill.core.io import atomic_save_npy
from distill.core.model import ESM
from distill.core.spec import parse_spec
from distill.inference import Inference
from distill.inference.encoders import load_encoder
from distill.inference.torch_backend import TorchBackend

EMBED_CHUNK = 4096  # sequences per progress step


def cache_dir() -> Path:
    return Path(os.environ.get("ESM_DISTILL_CACHE", Path.home() / ".cache" / "esm-distill")) / "embeddings"


def sequences_sha256(sequences: list[str]) -> str:
    h = hashlib.sha256()
    for s in sequences:
        h.update(s.encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass
class Featurizer:
    """A named feature extractor; ``model`` is None for the composition baseline."""

    name: str
    fingerprint: str  # identifies the weights: part of every cache key
    dim: int
    parameters: int
    model: ESM | None
    card: dict
    source: str = ""  # the spec it came from (a bundle path enables the train/test overlap check)

    def features(
        self, sequences: list[str], pooling: str = "mean", max_tokens: int = TRAIN_MAX_TOKENS, device: str = "cpu", quiet: bool = True
    ) -> np.ndarray:
        if pooling not in POOLINGS:
            raise ValueError(f"--pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        key = hashlib.sha256(f"{self.fingerprint}|{sequences_sha256(sequences)}|{pooling}|lead-crop-1022".encode()).hexdigest()[:24]
        path = cache_dir() / f"{key}.npy"
        if path.is_file():
            try:
                cached = np.load(path)
                if cached.shape == (len(sequences), self.dim):
                    return cached
            except (ValueError, OSError):
                pass  # a damaged cache file is recomputed and replaced
        out = composition(sequences) if self.model is None else embed(self.model, sequences, pooling, max_tokens, device, self.name, quiet)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(path, out)
        return out


def composition(sequences: list[str]) -> np.ndarray:
    """Frequencies of the 25 residue letters, in ``tokens.RESIDUE_LETTERS`` order."""
    out = np.zeros((len(sequences), len(tokens.RESIDUE_LETTERS)), dtype=np.float32)
    index = {c: i for i, c in enumerate(tokens.RESIDUE_LETTERS)}
    for row, seq in enumerate(sequences):
        for c in seq:
            out[row, index[c]] += 1
        out[row] /= max(len(seq), 1)
    return out


def embed(
    model: ESM, sequences: list[str], pooling: str, max_tokens: int, device: str = "cpu", name: str = "", quiet: bool = True
) -> np.ndarray:
    """Pooled last-layer vectors through the inference layer (leading 1,022 residues of longer sequences).

    Sequences go in chunks only so that the progress bar moves; each chunk is length-bucketed by token budget.
    """
    embedder = Inference(TorchBackend(model, device=device), max_tokens)
    out = np.zeros((len(sequences), model.cfg.dim), dtype=np.float32)
    columns = [TextColumn(f"embedding with {name}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=quiet, transient=True, console=Console(stderr=True)) as progress:
        task = progress.add_task("embed", total=len(sequences))
        for start in range(0, len(sequences), EMBED_CHUNK):
            part = embedder.embed(sequences[start : start + EMBED_CHUNK], "crop", tasks=[], cls=pooling == "cls")
            out[start : start + len(part)] = [e.sequence if pooling == "mean" else e.cls for e in part]
            progress.advance(task, len(part))
    return out


def n_cropped(sequences: list[str]) -> int:
    return sum(len(s) > tokens.MAX_RESIDUES for s in sequences)


def featurizer(spec: str) -> Featurizer:
    """Resolve a model spec (see the module docstring) through ``encoders.load_encoder``, named for tables."""
    if parse_spec(spec).kind == "composition":
        n = len(tokens.RESIDUE_LETTERS)
        return Featurizer("composition", "composition-v1", n, 0, None, {"name": "composition"}, spec)
    enc = load_encoder(spec)
    model, cfg, s = enc.model.eval(), enc.model.cfg, enc.spec
    if s.kind == "random":
        name = f"random-h{cfg.dim}-L{cfg.layers}" + (f"@{s.seed}" if s.seed else "")
        return Featurizer(name, f"random-seed{s.seed}-{enc.fingerprint}", cfg.dim, model.num_parameters(), model, {"name": name}, spec)
    name = _bundle_name(s.path, enc.card) if s.kind == "bundle" else s.name  # tables name students by how they were trained
    return Featurizer(name, enc.fingerprint, cfg.dim, model.num_parameters(), model, enc.card, spec)


def _bundle_name(path: Path, card: dict) -> str:
    """``Student-h128-L8-T2.0`` as the study writes it; ``-vanilla`` when trained without a teacher."""
    cfg, training = card["model"], card.get("training", {})
    base = f"Student-h{cfg['dim']}-L{cfg['layers']}"
    if not training:
        return f"{base} ({path.name})"
    name = base + ("-vanilla" if not training.get("lam") else f"-T{float(training.get('temperature', 0)):.1f}")
    rep = training.get("rep_weight") or 0
    centred = "-centred" if training.get("rep_centre") else ""
    return name + (f"-rep{rep:g}-{training.get('rep_level', 'pooled')}{centred}" if rep else "")  # representation KD: its own row
