"""How the API service talks to its engine and logs client errors: bounded retries of transient inter-service
failures, and 4xx answers logged as one line."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp  # BentoML's inter-service client
from pydantic import ValidationError

log = logging.getLogger("esm_distill.serve")


class ClientErrorsOnOneLine(logging.Filter):
    """A 4xx is the client's mistake, not the server's: BentoML logs it as an ERROR with a traceback; this makes it
    one WARNING line with the status and the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        code = getattr(exc, "error_code", None)
        code = 400 if isinstance(exc, ValidationError) else int(code) if code is not None else None
        if code is not None and 400 <= code < 500:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "%d on %s [%s]: %s", (code, *record.args, " ".join(str(exc).split()))
            record.exc_info = record.exc_text = None
        return True


RETRIES = 3
ENGINE_STALL_S = 60.0  # an engine call this slow is stuck (a full 256-sequence batch of the large preset takes ~25 s on 2 CPU cores)


def transient(e: BaseException) -> bool:
    """A dropped, half-read or stuck inter-service connection (retrying is safe: every engine call is pure)."""
    if isinstance(e, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError | TimeoutError):
        return True
    return isinstance(e, RuntimeError) and str(e) == "Connection closed."  # aiohttp's body read on a closed socket


async def call(method, *args: Any, stall_s: float | None = None) -> Any:  # noqa: ANN001
    """A call to a dependency, retried (bounded, logged) on a transient connection error, or when it takes longer
    than ``stall_s`` (a connection that never answers).

    BentoML 1.4's inter-service client keeps idle connections longer (aiohttp, 15 s) than the callee's server
    keeps them open (uvicorn, 5 s), so requests after a pause can hit a closed socket, while connecting or while
    reading the body (bentoml/BentoML#4971, fix proposed in #5698).
    """
    for attempt in range(1, RETRIES + 1):
        try:
            return await asyncio.wait_for(method(*args), stall_s)
        except Exception as e:
            if not transient(e) or attempt == RETRIES:
                raise
            why = f"no answer in {stall_s:.0f} s" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
            log.warning("retrying %s after a transient connection error (%s), attempt %d of %d", method, why, attempt, RETRIES)
