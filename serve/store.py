"""Students in BentoML's model store: `distill import` writes them, the service reads them.

A stored model holds ``model.onnx`` (fp32 graph, with the heads as ``<task>_probabilities`` outputs),
optionally ``model.int8.onnx``, and the student bundle itself under ``bundle/`` when it came from one (the
``student-torch`` backend uses it). Metadata: preset, parameters, tasks, source and its sha256.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from distill.core.config import INFERENCE_MAX_TOKENS
from distill.core.io import sha256_file
from distill.core.spec import parse_spec
from distill.inference import resolve

BACKENDS = ("student-onnx", "student-torch", "esm1b")


def model_name(source: str) -> str:
    """A model-store name from a model spec's display name: ``esm-distill-<name>`` (letters, digits, - _ .)."""
    return "esm-distill-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", parse_spec(source).name).strip("-").lower() or "model")


def content_sha256(path: Path, int8: bool) -> str:
    """What an import is made of: every file of the bundle (weights, config, heads) or the graph(s), and --int8."""
    h = hashlib.sha256(f"int8={int8}".encode())
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path, path.with_name(path.stem + ".int8.onnx")]
    for f in files:
        if f.is_file():
            h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()


def import_model(source: str, name: str | None = None, int8: bool = False) -> str:
    """Put a student bundle (exported to ONNX with its heads here) or an exported ``.onnx`` into the store; returns the tag."""
    import bentoml  # lazy, like the torch-side imports below: the service's ONNX path reads models only

    from export.onnx import export_command, read_metadata

    spec = parse_spec(source)
    path = Path(source)
    name = name or model_name(source)
    content = content_sha256(path, int8)
    try:
        versions = bentoml.models.list(name)
    except bentoml.exceptions.NotFound:
        versions = []
    for stored in versions:  # the same content imported before: its tag, not a new version
        if stored.info.metadata.get("content_sha256") == content:
            return str(stored.tag)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp)
        if spec.kind in ("bundle", "hf-dir"):  # a Hugging Face export serves like the bundle it came from
            result = export_command(source, staged / "model.onnx", int8=int8, heads=None)  # the bundle's heads, if any
            shutil.copytree(path, staged / "bundle")
            if int8 and "int8" not in result.paths:
                raise ValueError("the int8 graph failed its parity check; import without --int8")
        elif spec.kind == "onnx" and path.is_file():
            meta = read_metadata(path)
            if meta.get("esm_distill_contract") is None:
                raise ValueError(f"{path} is not an esm-distill graph (no esm_distill_contract in its metadata)")
            shutil.copy2(path, staged / "model.onnx")
            variant = path.with_name(path.stem + ".int8.onnx")
            if int8:
                if not variant.is_file():
                    raise ValueError(f"--int8 needs {variant} beside {path} (distill export onnx --int8)")
                shutil.copy2(variant, staged / "model.int8.onnx")
        else:
            raise ValueError(f"{source} is neither a student bundle directory, a Hugging Face ESM directory, nor an exported .onnx graph")
        meta = read_metadata(staged / "model.onnx")
        info: dict[str, Any] = {
            "preset": meta.get("preset"),
            "parameters": meta.get("parameters"),
            "dim": meta["architecture"]["dim"],
            "tasks": sorted(meta.get("labels") or {}),
            "source": str(source),
            "source_sha256": meta.get("source_sha256", ""),
            "int8": (staged / "model.int8.onnx").is_file(),
            "bundle": (staged / "bundle").is_dir(),
            "content_sha256": content,
        }
        with bentoml.models.create(name, labels={"framework": "esm-distill"}, metadata=info) as ref:
            for item in staged.iterdir():
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, Path(ref.path) / item.name)
        return str(ref.tag)


def open_stored(
    path: Path, backend: str = "student-onnx", variant: str = "fp32", providers: str = "auto", max_tokens: int = INFERENCE_MAX_TOKENS
):  # noqa: ANN201
    """The ``Inference`` for a stored model directory (ONNX Runtime, or torch over the bundle stored with it)."""

    path = Path(path)
    if backend not in BACKENDS[:2]:
        raise ValueError(f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")
    if backend == "student-torch":
        if not (path / "bundle").is_dir():
            raise ValueError("the student-torch backend needs a model imported from a bundle (this one was imported from an .onnx file)")
        return resolve(path / "bundle", providers=providers, max_tokens=max_tokens)
    if variant not in ("fp32", "int8"):
        raise ValueError(f"unknown variant {variant!r}; choose fp32 or int8")
    graph = path / ("model.int8.onnx" if variant == "int8" else "model.onnx")
    if not graph.is_file():
        raise ValueError(f"this model was imported without its int8 graph ({graph} missing); re-import with --int8")
    from distill.inference import Inference
    from distill.inference.onnx_backend import OnnxBackend

    return Inference(OnnxBackend(graph, providers, arena=False), max_tokens)  # no arena: a burst's memory comes back
