"""Request-head limits for the HTTP server: close a connection whose request head does not arrive in time, or
grows past a size (a 64 MB header was accepted before).

uvicorn (what BentoML 1.4 serves with) closes an idle keep-alive connection 5 s after its last answer, but has no
header timeout: a connection that never sends a byte, or stops in the middle of its request line or headers, stays
open for good, and a few thousand of them exhaust the worker's file descriptors (slowloris). Neither uvicorn nor
BentoML has a setting for it, so this module adds one to uvicorn's HTTP protocol classes (h11, and httptools when
installed) in the worker process: a timer armed when a connection opens and again after every answer, which closes
the connection if, when it fires, no request head has arrived since. A request being read or answered is never cut
(slow bodies are bounded by the body deadline and size limit of serve/guard.py). The size limit counts the bytes of
a request head before the parser sees them (one read can carry a whole head): past ``MAX_HEAD_BYTES``, it is
answered 431 and closed (httptools has no limit of its own; h11's is its 16 KiB incomplete-event limit, which it answers with
a plain 400). Installed by serve/service.py at import, before uvicorn loads its protocol class.
"""

from __future__ import annotations

import importlib
import logging

log = logging.getLogger("esm_distill.serve")
PROTOCOLS = ("uvicorn.protocols.http.h11_impl:H11Protocol", "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol")
HOOKED = ("connection_made", "on_response_complete", "connection_lost", "data_received")
MAX_HEAD_BYTES = 64 * 1024  # request line + headers; this API's requests send a few hundred bytes of them
TOO_LARGE = (b'HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\nconnection: close\r\n'
             b'content-length: %d\r\n\r\n%s')  # fmt: skip


def waiting_for_head(protocol: object) -> bool:
    """No request in flight: none yet on this connection, or the last one answered (both protocol classes keep a
    ``cycle`` per request, made when its head is complete)."""
    cycle = getattr(protocol, "cycle", None)
    return cycle is None or cycle.response_complete


def _expire(protocol: object) -> None:
    transport = protocol.transport
    if transport is not None and not transport.is_closing() and waiting_for_head(protocol):
        client = f"{protocol.client[0]}:{protocol.client[1]}" if protocol.client else "a client"
        log.info("closed the connection of %s: no complete request head within %.0f s", client, protocol.esm_head_timeout)
        transport.close()


def _refuse_head(protocol: object) -> None:
    body = b'{"error": {"status": 431, "message": "request head over %d bytes: send fewer or shorter headers"}}' % MAX_HEAD_BYTES
    protocol.transport.write(TOO_LARGE % (len(body), body))
    protocol.transport.close()


def _head_fits(protocol: object, data: bytes) -> bool:
    """Count the bytes of the request head in ``data`` (up to its blank line, which may straddle two reads); False
    past ``MAX_HEAD_BYTES``. Checked before the parser sees the data: one read can carry a whole oversized head."""
    seen = getattr(protocol, "esm_head_tail", b"") + data
    end = seen.find(b"\r\n\r\n")
    size = getattr(protocol, "esm_head_bytes", 0) + (end + 4 - (len(seen) - len(data)) if end >= 0 else len(data))
    protocol.esm_head_bytes, protocol.esm_head_tail = (0, b"") if end >= 0 else (size, seen[-3:])
    return size <= MAX_HEAD_BYTES


def _arm(protocol: object) -> None:
    _disarm(protocol)
    if protocol.transport is not None and not protocol.transport.is_closing():
        protocol.esm_head_timer = protocol.loop.call_later(protocol.esm_head_timeout, _expire, protocol)


def _disarm(protocol: object) -> None:
    timer = getattr(protocol, "esm_head_timer", None)
    if timer is not None:
        timer.cancel()
        protocol.esm_head_timer = None


def install(seconds: float) -> list[str]:
    """Give uvicorn's HTTP protocols a ``seconds`` request-head deadline; returns the classes hooked. A class that
    lacks the methods this relies on (another uvicorn version) is left alone with a warning, never half-patched."""
    hooked = []
    for spec in PROTOCOLS:
        module, name = spec.split(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except ImportError:  # httptools is optional
            continue
        if getattr(cls, "esm_head_timeout", None) is not None:
            cls.esm_head_timeout = seconds
            hooked.append(name)
            continue
        if not all(callable(getattr(cls, m, None)) for m in HOOKED):
            log.warning("%s has no %s: no request-head deadline (uvicorn changed; put a proxy with one in front)", spec, HOOKED)
            continue
        made, complete, lost, received = (getattr(cls, m) for m in HOOKED)

        def connection_made(self, transport, _made=made) -> None:  # noqa: ANN001
            _made(self, transport)
            _arm(self)

        def on_response_complete(self, _complete=complete) -> None:  # noqa: ANN001
            _complete(self)
            _arm(self)

        def connection_lost(self, exc, _lost=lost) -> None:  # noqa: ANN001
            _disarm(self)
            _lost(self, exc)

        def data_received(self, data: bytes, _received=received) -> None:
            if waiting_for_head(self) and not _head_fits(self, data):
                if self.transport is not None and not self.transport.is_closing():
                    _refuse_head(self)
                return
            _received(self, data)

        cls.connection_made, cls.on_response_complete, cls.connection_lost = connection_made, on_response_complete, connection_lost
        cls.data_received = data_received
        cls.esm_head_timeout = seconds
        hooked.append(name)
    return hooked
