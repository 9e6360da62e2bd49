"""`distill serve`: check the model, import it into the store when given a path, start `bentoml serve` with arguments."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from distill.core.spec import parse_spec
from serve.schemas import API_KEY_ENV, ServeArgs
from serve.store import BACKENDS, import_model
from serve.watchdog import stop_group


def serve_args(model: str, backend: str, variant: str, console: Console, **given) -> ServeArgs:  # noqa: ANN003
    """Validated start-up arguments; a bundle or ``.onnx`` path is imported into the model store first."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    reference = given.get("reference")
    if reference and not (Path(reference) / "index.json").is_file():
        raise ValueError(f"--reference {reference} is not a `distill index` directory (no index.json)")
    if backend == "esm1b":
        if parse_spec(model).kind != "fair-esm":
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


GRACE_S = 10.0  # after SIGTERM, how long BentoML gets to finish in-flight requests before SIGKILL


def launch(args: ServeArgs, host: str, port: int, console: Console) -> int:
    """Run `bentoml serve` with ``args`` (as an ``--arg-file``: ``--arg`` would split values at commas) in its own
    process group; its exit status.

    SIGINT / SIGTERM are forwarded to the whole group, which is killed if it has not stopped ``GRACE_S`` later. A
    watchdog process stops the group when this process dies without a chance to (SIGKILL), so no server outlives it.
    """
    with tempfile.TemporaryDirectory(prefix="esm-distill-serve-") as tmp:
        # The API key never goes into the arguments: BentoML passes them to its workers on their command lines, which
        # any local user can read (/proc/PID/cmdline). It reaches them in the environment, readable by its owner only.
        arg_file = Path(tmp) / "args.json"  # JSON is YAML
        arg_file.write_text(args.model_copy(update={"api_key": ""}).model_dump_json())
        env = os.environ | ({API_KEY_ENV: args.api_key} if args.api_key else {})
        cmd = [sys.executable, "-m", "bentoml", "serve", "serve.service:EsmDistillService", "--port", str(port), "--host", host,
               "--arg-file", str(arg_file)]  # fmt: skip
        served = args.model if args.backend != "esm1b" else args.esm1b
        console.print(f"serving {served} on http://{host}:{port} ({args.backend}, {args.variant})")
        server = subprocess.Popen(cmd, start_new_session=True, env=env)
        watchdog = subprocess.Popen([sys.executable, "-m", "serve.watchdog", str(server.pid), str(GRACE_S)], stdin=subprocess.PIPE,
                                    start_new_session=True, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
        try:
            return _wait(server)
        finally:
            stop_group(server.pid, GRACE_S)
            watchdog.stdin.close()  # the watchdog finds the group gone and exits
            watchdog.wait()


def _wait(server: subprocess.Popen) -> int:
    """Wait for the server; a SIGINT / SIGTERM here is passed to its group, and SIGKILL follows after ``GRACE_S``."""
    deadline: list[float] = []

    def forward(signum: int, frame: object) -> None:
        deadline.append(time.monotonic() + GRACE_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                return server.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if deadline and time.monotonic() > deadline[0]:
                    stop_group(server.pid, 0.0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
