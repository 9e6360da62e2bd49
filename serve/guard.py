"""The service's front door (an ASGI middleware): API key, request-size limit, JSON only, one 4xx shape.

Runs before BentoML parses anything, so an oversized body is refused (413) after reading at most the limit, never
after the API worker has parsed and copied it; a body that stops arriving for the client timeout is answered 408
(the request head's deadline is serve/slow_clients.py). Every 4xx answer, ours and BentoML's, has one shape::

    {"error": {"status": 400, "message": "sequence 1: illegal residue 'J' at position 6; allowed: ..."}}
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
OPEN_PATHS = ("/health", "/healthz", "/readyz", "/livez", "/metrics")  # reachable without the API key


def limit_for(max_sequences: int, max_residues: int) -> int:
    """Bytes a valid request can need: its residues, JSON punctuation per sequence, and the other fields."""
    return max_residues + 16 * max_sequences + 4096


def error_body(status: int, message: str) -> bytes:
    return json.dumps({"error": {"status": status, "message": message}}, ensure_ascii=False).encode()


def message_of(body: bytes) -> str:
    """The text of BentoML's own 4xx bodies: ``{"error": ...}``, ``[{"error": ...}]``, or a pydantic validation error
    (``{"error": "1 validation error for Input", "detail": [{"loc": [...], "msg": ...}]}``) with every field named."""
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return body.decode(errors="replace").strip()
    texts = []
    for item in obj if isinstance(obj, list) else [obj]:
        if not isinstance(item, dict):
            texts.append(str(item))
            continue
        text = str(item.get("error", ""))
        fields = [
            f"{'.'.join(str(x) for x in d.get('loc', []))}: {d.get('msg', '')}" for d in item.get("detail") or [] if isinstance(d, dict)
        ]
        texts.append(": ".join(t for t in (text, "; ".join(fields)) if t) or json.dumps(item))
    return "; ".join(texts)


MAX_JSON_DEPTH = 32  # no request of this API nests deeper than 3; far below the parser's recursion limit


def parse_body(body: bytes) -> tuple[Any, str | None]:
    """(the request's JSON, None), or (None, why it is not JSON this service reads). Every failure of the parser is
    caught here, before BentoML parses the body again: syntax, encoding, an integer past Python's 4,300-digit limit
    (ValueError) and nesting past the recursion limit (RecursionError); nesting deeper than MAX_JSON_DEPTH too."""
    if not body.strip():
        return None, None  # an empty body is BentoML's to answer (endpoints without arguments take one)
    try:
        obj = json.loads(body)
    except RecursionError:
        return None, f"request JSON nests deeper than {MAX_JSON_DEPTH} levels"
    except Exception as e:  # noqa: BLE001 (JSONDecodeError, UnicodeDecodeError, ValueError: all one answer to the client)
        return None, f"request body is not valid JSON: {str(e)[:200]}"
    stack = [(obj, 1)]
    while stack:  # iterative: a deep structure must not recurse here either
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                return None, f"request JSON nests deeper than {MAX_JSON_DEPTH} levels"
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return obj, None


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # no glibc (musl, macOS): nothing to trim
        return None


def release_memory() -> None:
    """glibc's ``malloc_trim(0)``: freed heap pages go back to the OS; a no-op where there is no glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class Guard:
    def __init__(
        self, app: Callable, max_bytes: int, api_key: str = "", fields: dict[str, set[str]] | None = None, body_timeout: float = 10.0,
        max_concurrency: int = 0,
    ):  # fmt: skip
        self.app, self.max_bytes, self.api_key, self.body_timeout = app, max_bytes, api_key, body_timeout
        self.fields = fields or {}  # endpoint path -> the request fields it takes; anything else is a 400
        self.max_concurrency, self.in_flight = max_concurrency, 0  # 0: no cap

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        if self.api_key and not path.startswith(OPEN_PATHS) and not self._authorised(headers):
            return await self._refuse(
                send,
                401,
                "missing or wrong API key: send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                [(b"www-authenticate", b'Bearer realm="esm-distill"')],
            )
        if scope.get("method") != "POST":  # GET /embed's 405, an unknown path's 404: in the one error shape too
            return await self.app(scope, receive, self._one_shape(send))
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):  # RFC 9110: 415 for a content coding the server does not take
            return await self._refuse(send, 415, f"compressed bodies are not supported (Content-Encoding: {encoding}); send plain JSON")
        if not headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
            return await self._refuse(
                send, 415, f"send JSON with 'Content-Type: application/json' (got {headers.get('content-type', 'none')!r})"
            )
        declared = int(headers.get("content-length") or 0)
        if declared > self.max_bytes:
            return await self._refuse(send, 413, self._too_large(declared))
        body, more = b"", True
        try:  # the whole body within one deadline: a client that stalls, or drips a byte at a time, holds a worker slot
            async with asyncio.timeout(self.body_timeout):
                while more:  # read (at most the limit) before the app sees anything
                    message = await receive()
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > self.max_bytes:
                        return await self._refuse(send, 413, self._too_large(len(body), streamed=True))
        except TimeoutError:
            return await self._refuse(
                send, 408, f"request body not complete within {self.body_timeout:g} s ({len(body):,} bytes arrived); send the body at once"
            )
        obj, problem = parse_body(body)
        if problem:
            return await self._refuse(send, 400, problem)
        unknown = sorted(set(obj) - self.fields[path]) if path in self.fields and isinstance(obj, dict) else []
        if unknown:
            return await self._refuse(send, 400, f"unknown field(s) {unknown} for {path}; it takes {sorted(self.fields[path])}")
        if self.max_concurrency and self.in_flight >= self.max_concurrency:  # full: refuse now, not after a queue
            return await self._refuse(
                send, 503, f"the server is busy ({self.in_flight} requests in flight, its limit); retry shortly", [(b"retry-after", b"1")]
            )
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        self.in_flight += 1
        try:
            await self.app(scope, replay, self._one_shape(send))
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:  # idle again: hand a burst's freed heap back to the OS (glibc keeps it otherwise)
                release_memory()

    def _authorised(self, headers: dict[str, str]) -> bool:
        if "x-api-key" in headers:
            sent = headers["x-api-key"]
        else:  # RFC 7235: the scheme is case-insensitive, and a credential without it is no Bearer credential
            scheme, _, sent = headers.get("authorization", "").strip().partition(" ")
            sent = sent.strip() if scheme.lower() == "bearer" else ""
        return bool(sent) and hmac.compare_digest(sent.encode(), self.api_key.encode())

    def _too_large(self, size: int, streamed: bool = False) -> str:
        amount = f"more than {size:,}" if streamed else f"{size:,}"
        return (f"request body of {amount} bytes exceeds the limit of {self.max_bytes:,} bytes (set by --max-sequences / "
                "--max-residues, or --max-request-bytes); split the request")  # fmt: skip

    async def _refuse(self, send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
        body = error_body(status, message)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    def _one_shape(self, send: Send) -> Send:
        """Every 4xx body in the one documented shape, and every answer as one start and one body message: BentoML
        sends each body chunk and then an empty last one, and each message costs a pass through its tracing, metrics
        and access-log middleware (our answers are whole JSON documents, never streams)."""
        state: dict[str, Any] = {"start": None, "body": b""}

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["start"] = message
                return
            if message["type"] != "http.response.body":
                return await send(message)
            state["body"] += message.get("body", b"")
            if message.get("more_body"):
                return
            start, body = state["start"], state["body"]
            if 400 <= start["status"] < 500:
                body = error_body(start["status"], message_of(body))
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
                start = {
                    **start,
                    "headers": headers + [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            await send(start)
            await send({"type": "http.response.body", "body": body})

        return wrapped
