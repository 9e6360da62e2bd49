"""The student bundle: the one artifact that export, serving, probing and annotation take.

student/
  config.json          {"format": "esm-distill-bundle", "version": 1, "model": {...ModelConfig},
                        "alphabet": {...}, "preset": ..., "parameters": ..., "training": {...}}
  model.safetensors    weights (the tied LM-head weight stored once)
  training_sequences.npy   uint64 digests of the training sequences (``data.sequence_digests``), so probes
                       can warn when test sequences were seen in MLM training
  heads/<task>/        classification heads written by ``distill probe`` (head.safetensors + labels.json)
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from distill.core import tokens
from distill.core.config import ModelConfig
from distill.core.hf import find, load_hf
from distill.core.io import atomic_write_json, read_json_object, umask
from distill.core.model import ESM, build_student
from distill.core.spec import GRAMMAR, ModelSpec, parse_spec

if TYPE_CHECKING:
    from distill.core.unirep import UniRep

FORMAT = "esm-distill-bundle"
VERSION = 1


class BundleError(ValueError):
    """A missing, corrupt or mismatched bundle; the message says which and why."""


def alphabet_card() -> dict[str, Any]:
    return {
        "name": "ESM-1b",
        "tokens": list(tokens.TOKENS),
        "padding_idx": tokens.PAD,
        "mask_idx": tokens.MASK,
        "cls_idx": tokens.CLS,
        "eos_idx": tokens.EOS,
        "prepend_bos": True,
        "append_eos": True,
    }


def save_bundle(
    directory: Path, model: ESM, preset: str | None, training: dict[str, Any] | None = None, training_digests: np.ndarray | None = None
) -> Path:
    """Write a bundle atomically: built in a temporary directory, then swapped into place.

    New weights make old heads meaningless, so a rewritten bundle starts without ``heads/``.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    tmp.chmod(0o777 & ~umask())  # mkdtemp makes 0700 directories
    try:
        save_model(model, str(tmp / "model.safetensors"))
        if training_digests is not None:
            np.save(tmp / "training_sequences.npy", np.asarray(training_digests, dtype=np.uint64))
        atomic_write_json(
            tmp / "config.json",
            {
                "format": FORMAT,
                "version": VERSION,
                "model": model.cfg.to_dict(),
                "alphabet": alphabet_card(),
                "preset": preset,
                "parameters": model.num_parameters(),
                "training": training or {},
            },
        )
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask())
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_bundle_config(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"{directory} is not a directory; a student bundle is a directory with config.json and model.safetensors")
    path = directory / "config.json"
    if not path.is_file():
        raise BundleError(f"{directory} is not a student bundle: config.json is missing")
    try:
        card = read_json_object(path)
    except ValueError as e:
        raise BundleError(str(e)) from e
    if card.get("format") != FORMAT:
        raise BundleError(f"{path} is not an esm-distill bundle config (format is {card.get('format')!r})")
    if card.get("version", 0) > VERSION:
        raise BundleError(f"{path} has bundle version {card['version']}; this esm-distill reads up to {VERSION}")
    if card.get("alphabet", {}).get("tokens") != alphabet_card()["tokens"]:
        raise BundleError(f"{path}: the bundle's alphabet differs from ESM-1b's; it cannot share the teacher's vocabulary")
    return card


def load_bundle(directory: Path) -> tuple[ESM, dict[str, Any]]:
    directory = Path(directory)
    card = read_bundle_config(directory)
    try:
        cfg = ModelConfig(**card["model"])
    except (TypeError, ValueError, KeyError) as e:
        raise BundleError(f"{directory}/config.json: invalid model section: {e}") from e
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise BundleError(f"{directory} is not a complete bundle: model.safetensors is missing")
    model = ESM(cfg)
    try:
        load_model(model, str(weights), strict=True)
    except SafetensorError as e:
        raise BundleError(f"{weights} is corrupt or truncated: {e}") from e
    except RuntimeError as e:
        raise BundleError(f"{weights} does not match the architecture in config.json ({cfg.layers} layers, dim {cfg.dim}): {e}") from e
    return model.eval(), card


def training_digests(directory: Path) -> np.ndarray | None:
    path = Path(directory) / "training_sequences.npy"
    return np.load(path) if path.is_file() else None


def load_any(spec: str | ModelSpec) -> tuple[ESM | UniRep, dict[str, Any]]:
    """The one torch model loader, for every spec whose weights torch loads (``distill.core.spec``): a bundle,
    ``random:``, a fair-esm name or ``.pt``, a Hugging Face directory or hub id, UniRep -> (model in eval mode, card).
    A UniRep is not an ``ESM`` but answers like one (logits over ESM's tokens, representations, ``cfg.dim``)."""
    s = spec if isinstance(spec, ModelSpec) else parse_spec(spec)
    match s.kind:
        case "random":
            model = build_student(s.config, seed=s.seed)
            return model.eval(), {"name": s.text, "model": s.config.to_dict(), "preset": s.preset, "parameters": model.num_parameters()}
        case "bundle":
            return load_bundle(s.path)
        case "hf-dir":
            return load_hf(s.path)
        case "hf-hub":
            return load_hf(find(s.text))  # its snapshot in the local HF cache, or a message saying how to get it
        case "fair-esm":
            from distill.core.pretrained import load_pretrained  # fair-esm: only for its specs

            model = load_pretrained(s.text).eval()
            return model, {"name": s.text, "model": model.cfg.to_dict(), "parameters": model.num_parameters(), "preset": None}
        case "unirep":
            from distill.core.unirep import load_unirep

            model, path = load_unirep(s.base)
            if s.int8:
                model.quantize_int8()
            return model, {
                "name": s.name,
                "model": model.cfg.to_dict(),
                "parameters": model.num_parameters(),
                "preset": None,
                "weights": str(path),
            }
    raise BundleError(f"{s.text!r} is a {s.kind} model, not weights torch can load here: give {GRAMMAR}")
