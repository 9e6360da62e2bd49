"""`distill serve`: check the model, import it into the store when given a path, start `bentoml serve` with arguments."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from distill.core.spec import parse_spec
from serve.schemas import API_KEY_ENV, ServeArgs
from serve.store import BACKENDS, import_model


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
SUPERVISOR = Path(__file__).with_name("supervisor.py")  # run as a script: stdlib only, and the caller's working directory


def launch(args: ServeArgs, host: str, port: int, console: Console) -> int:
    """Run `bentoml serve` with ``args`` (as an ``--arg-file``: ``--arg`` would split values at commas) below a
    supervisor (`serve/supervisor.py`) in its own session; the server's exit status.

    SIGINT / SIGTERM are forwarded to the supervisor, which passes them to the server and SIGKILLs whatever is left
    ``GRACE_S`` later. When this process dies without a chance to (SIGKILL), the pipe it holds to the supervisor's
    stdin closes and the supervisor does the same, so no server process outlives it.
    """
    tmp = tempfile.mkdtemp(prefix="esm-distill-serve-")  # removed by the supervisor, however this process ends
    # The API key never goes into the arguments: BentoML passes them to its workers on their command lines, which
    # any local user can read (/proc/PID/cmdline). It reaches them in the environment, readable by its owner only.
    arg_file = Path(tmp) / "args.json"  # JSON is YAML
    arg_file.write_text(args.model_copy(update={"api_key": ""}).model_dump_json())
    env = os.environ | ({API_KEY_ENV: args.api_key} if args.api_key else {})
    cmd = [sys.executable, "-m", "bentoml", "serve", "serve.service:EsmDistillService", "--port", str(port), "--host", host,
           "--arg-file", str(arg_file)]  # fmt: skip
    served = args.model if args.backend != "esm1b" else args.esm1b
    console.print(f"serving {served} on http://{host}:{port} ({args.backend}, {args.variant})")
    supervisor = subprocess.Popen([sys.executable, str(SUPERVISOR), str(GRACE_S), tmp, *cmd], stdin=subprocess.PIPE, env=env,
                                  start_new_session=True)  # fmt: skip
    try:
        return _wait(supervisor)
    finally:
        supervisor.stdin.close()  # if still running, the supervisor stops the server as if this process had died
        supervisor.wait()


def _wait(supervisor: subprocess.Popen) -> int:
    """Wait for the supervisor; a SIGINT / SIGTERM here is passed on to it."""

    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            supervisor.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return supervisor.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
