"""The request-head deadline on both of uvicorn's HTTP parsers, in-process (the real-server test is in test_service.py)."""

import socket
import threading
import time

import pytest
import uvicorn

from serve import slow_clients

DEADLINE = 0.5  # seconds


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(params=["h11", "httptools"])
def port(request):
    if request.param == "httptools":
        pytest.importorskip("httptools")
    assert "H11Protocol" in slow_clients.install(DEADLINE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free, http=request.param, log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:  # bounded by the server thread: it either starts or dies
        assert thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    yield free
    server.should_exit = True
    thread.join(timeout=30)


def closed_after(port: int, data: bytes) -> tuple[float, bytes]:
    """Seconds until the server closes a connection that sent ``data``, and what it answered."""
    start, answer = time.monotonic(), b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        while chunk := s.recv(65536):
            answer += chunk
    return time.monotonic() - start, answer


@pytest.mark.parametrize(
    "data", [b"", b"GET / HT", b"GET / HTTP/1.1\r\nHost: x\r\nAcc"], ids=["nothing", "half a line", "half the headers"]
)
def test_a_connection_without_a_complete_request_head_is_closed_at_the_deadline(port, data):
    elapsed, answer = closed_after(port, data)
    assert answer == b"" and elapsed >= DEADLINE * 0.9


def test_a_complete_request_is_answered_and_the_idle_connection_closed_after_it(port):
    elapsed, answer = closed_after(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok") and elapsed >= DEADLINE * 0.9


def test_install_leaves_a_class_without_the_hooks_alone(monkeypatch, caplog):
    class Bare:
        pass

    monkeypatch.setattr(slow_clients, "PROTOCOLS", ("tests_fake:Bare",))
    monkeypatch.setitem(__import__("sys").modules, "tests_fake", type("M", (), {"Bare": Bare}))
    assert slow_clients.install(1.0) == [] and not hasattr(Bare, "esm_head_timeout")
    assert "no request-head deadline" in caplog.text


def test_a_request_head_past_the_size_limit_is_answered_431_and_closed(port):
    """Finding 5: a 64 MB request header was accepted (and its memory kept). Past 64 KiB without a complete head the
    connection is answered and closed, on both parsers (h11 refuses at its own 16 KiB limit, with a 400)."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(64):  # up to 1 MiB of header, 16 KiB at a time, reading between pieces
                s.sendall(b"a" * 16384)
                s.settimeout(0.05)
                try:
                    if chunk := s.recv(65536):
                        answer += chunk
                        break
                except TimeoutError:
                    continue
            s.settimeout(30)
            while chunk := s.recv(65536):
                answer += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass  # closed while we were still sending: refused all the same
    assert answer.startswith((b"HTTP/1.1 431", b"HTTP/1.1 400")), answer[:80]  # answered before the head deadline
    _, ok = closed_after(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200")
