"""One ``resolve(spec)`` for every model spec (``distill.core.spec``); it returns an ``Inference``.

An ``onnx`` spec runs on ONNX Runtime and never imports torch; ``http`` asks a running `distill serve`; every other
kind is a torch model, with a bundle's own heads or those of ``heads``.
"""

from __future__ import annotations

from pathlib import Path

from distill.core.config import INFERENCE_MAX_TOKENS
from distill.core.spec import parse_spec
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
    s = parse_spec(spec)
    if s.kind == "http":
        from distill.inference.http_backend import HttpBackend  # each backend's imports only when it is used

        return Inference(HttpBackend(s.text, api_key=api_key), max_tokens)
    if s.kind == "onnx":
        from distill.inference.onnx_backend import OnnxBackend  # lazy: the ONNX path must not import torch

        if heads:
            raise ValueError(f"{s.text} carries its heads in the graph; --heads is for fair-esm models")
        return Inference(OnnxBackend(s.path, providers, threads), max_tokens)
    if threads:
        import torch

        torch.set_num_threads(threads)
    return Inference(torch_backend(s.text, heads, "cpu" if providers == "cpu" else "auto"), max_tokens)


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
        if (hp / "labels.json").is_file():  # one head, named by its task (its folder may be called anything)
            head = load_head(hp, dim)
            found = {head.task: head}
        else:  # a directory of <task>/ heads, as `distill probe --out` writes them
            found = heads_in(hp, dim)
    elif enc.spec.kind in ("bundle", "hf-dir"):
        found = heads_of(enc.spec.path, dim)
    return TorchBackend(enc.model, found, enc.name, {"source": spec, "preset": enc.card.get("preset")}, device)
