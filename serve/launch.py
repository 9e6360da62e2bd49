"""`distill serve`: check the model, import it into the store when given a path, start `bentoml serve` with arguments."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from serve.schemas import ServeArgs
from serve.store import BACKENDS, import_model


def serve_args(model: str, backend: str, variant: str, console: Console, **given) -> ServeArgs:  # noqa: ANN003
    """Validated start-up arguments; a bundle or ``.onnx`` path is imported into the model store first."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    reference = given.get("reference")
    if reference and not (Path(reference) / "index.json").is_file():
        raise ValueError(f"--reference {reference} is not a `distill index` directory (no index.json)")
    if backend == "esm1b":
        from distill.pretrained import is_fair_esm_spec  # fair-esm: only for this backend

        if not is_fair_esm_spec(model):
            raise ValueError(f"--backend esm1b serves a fair-esm model: give its name or a .pt, not {model!r}")
        return ServeArgs(backend=backend, variant=variant, esm1b=model, **given)
    if Path(model).exists():
        tag = import_model(model, None, variant == "int8")
        console.print(f"imported {model} as {tag}")
    else:
        import bentoml

        try:
            tag = str(bentoml.models.get(model).tag)
        except bentoml.exceptions.NotFound as e:
            raise ValueError(f"{model} is neither a path nor a model in the BentoML store (`bentoml models list`)") from e
    return ServeArgs(model=tag, backend=backend, variant=variant, **given)


def launch(args: ServeArgs, host: str, port: int, console: Console) -> int:
    """Run `bentoml serve` in the foreground with ``args`` as an ``--arg-file`` (``--arg`` would split values at
    commas); its exit status."""
    with tempfile.TemporaryDirectory(prefix="esm-distill-serve-") as tmp:
        arg_file = Path(tmp) / "args.json"  # JSON is YAML
        arg_file.write_text(args.model_dump_json())
        cmd = [sys.executable, "-m", "bentoml", "serve", "serve.service:EsmDistillService", "--port", str(port), "--host", host,
               "--arg-file", str(arg_file)]  # fmt: skip
        served = args.model if args.backend != "esm1b" else args.esm1b
        console.print(f"serving {served} on http://{host}:{port} ({args.backend}, {args.variant})")
        return subprocess.call(cmd)
