"""One ``resolve(spec)`` for every way a model is named; it returns an ``Inference``.

X.onnx                   an exported graph (heads inside) -> ONNX Runtime; torch is never imported
http(s)://HOST:PORT      a running `distill serve` -> its annotate endpoint
DIR                      a student bundle, with the heads in DIR/heads -> torch
NAME | FILE.pt           a fair-esm model (ESM-1b), heads from ``heads`` -> torch
random:PRESET[@SEED]     a randomly initialised model (a baseline), random:DIR[@SEED] with a bundle's shape
"""

from __future__ import annotations

from pathlib import Path

from distill.core.config import INFERENCE_MAX_TOKENS
from distill.inference.layer import Inference


def resolve(
    spec: str | Path,
    heads: str | None = None,
    providers: str = "auto",
    max_tokens: int = INFERENCE_MAX_TOKENS,
    api_key: str = "",
    threads: int = 0,
) -> Inference:
    """``providers``: auto | cpu | cuda | tensorrt for ONNX Runtime; torch takes cpu, else CUDA when present;
    ``api_key`` for a service started with one; ``threads``: intra-op CPU threads (0: the library's default)."""
    spec = str(spec)
    if spec.startswith(("http://", "https://")):
        from distill.inference.http_backend import HttpBackend  # each backend's imports only when it is used

        return Inference(HttpBackend(spec, api_key=api_key), max_tokens)
    if spec.endswith(".onnx"):
        from distill.inference.onnx_backend import OnnxBackend  # lazy: the ONNX path must not import torch

        if heads:
            raise ValueError(f"{spec} carries its heads in the graph; --heads is for fair-esm models")
        return Inference(OnnxBackend(Path(spec), providers, threads), max_tokens)
    if threads:
        import torch

        torch.set_num_threads(threads)
    return Inference(torch_backend(spec, heads, "cpu" if providers == "cpu" else "auto"), max_tokens)


def torch_backend(spec: str, heads: str | None = None, device: str = "auto"):  # noqa: ANN201 (TorchBackend: imports torch)
    """A bundle, fair-esm model or ``random:`` spec with its heads (a bundle's own, or a head directory)."""
    from distill.core.heads import heads_in, heads_of, load_head
    from distill.inference.encoders import load_encoder  # torch: imported here so that the other backends never load it
    from distill.inference.torch_backend import TorchBackend

    enc = load_encoder(spec)
    dim = enc.model.cfg.dim
    found = {}
    if heads:
        hp = Path(heads)
        if not hp.is_dir():
            raise FileNotFoundError(f"head directory {hp} does not exist")
        if (hp / "labels.json").is_file():  # one head
            found = {hp.name: load_head(hp, dim)}
        else:  # a directory of <task>/ heads, as `distill probe --out` writes them
            found = heads_in(hp, dim)
    elif Path(spec).is_dir():
        found = heads_of(Path(spec), dim)
    path = Path(spec)
    name = path.name if path.exists() else spec
    return TorchBackend(enc.model, found, name, {"source": spec, "preset": enc.card.get("preset")}, device)
