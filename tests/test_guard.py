"""The service's front door in-process: API key, body limit before parsing, JSON only, one 4xx shape."""

import json

from starlette.testclient import TestClient

from serve.guard import Guard, limit_for, message_of

seen: list[bytes] = []


async def app(scope, receive, send):
    """A stand-in for BentoML: echoes the body's length, or answers 400 the way BentoML does (a list of errors)."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    seen.append(body)
    status, out = (400, b'[{"error":"sequence 1: empty sequence"}]') if b"bad" in body else (200, json.dumps({"n": len(body)}).encode())
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": out})


def client(**options) -> TestClient:
    return TestClient(Guard(app, **{"max_bytes": 1000, **options}))


def test_body_limit_is_enforced_before_the_app_reads_anything():
    seen.clear()
    ok = client().post("/embed", json={"sequences": ["MKV"]})
    assert ok.status_code == 200 and ok.json() == {"n": len(b'{"sequences":["MKV"]}')}
    big = client().post("/embed", content=b'{"sequences": ["' + b"M" * 5000 + b'"]}', headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["status"] == 413
    assert "5,019 bytes exceeds the limit of 1,000 bytes" in big.json()["error"]["message"]

    def chunks():  # no Content-Length: counted while streaming, refused once past the limit
        for _ in range(100):
            yield b"M" * 100

    streamed = client().post("/embed", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and "request body of more than" in streamed.json()["error"]["message"]
    assert len(seen) == 1  # only the small request ever reached the app
    assert limit_for(64, 65536) == 65536 + 16 * 64 + 4096


def test_json_only_and_one_4xx_shape():
    res = client().post("/embed", content=b"MKV", headers={"content-type": "text/plain"})
    assert res.status_code == 415 and res.json() == {
        "error": {"status": 415, "message": "send JSON with 'Content-Type: application/json' (got 'text/plain')"}
    }
    import gzip

    packed = gzip.compress(b'{"sequences": ["MKV"]}')
    res = client().post("/embed", content=packed, headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert res.status_code == 415 and res.json()["error"]["message"] == (
        "compressed bodies are not supported (Content-Encoding: gzip); send plain JSON"
    )
    res = client().post("/embed", json={"sequences": ["bad"]})
    assert res.status_code == 400 and res.json() == {"error": {"status": 400, "message": "sequence 1: empty sequence"}}
    assert message_of(b'{"error": "x"}') == "x" and message_of(b"not json") == "not json"
    pydantic = b'{"error": "1 validation error for Input", "detail": [{"loc": ["top_k"], "msg": "Input should be a valid integer"}]}'
    assert message_of(pydantic) == "1 validation error for Input: top_k: Input should be a valid integer"


def test_api_key_guards_every_endpoint_but_health():
    c = client(api_key="s3cret")
    assert c.post("/embed", json={"sequences": ["MKV"]}).status_code == 401
    assert c.post("/embed", json={"sequences": ["MKV"]}, headers={"authorization": "Bearer wrong"}).status_code == 401
    assert c.post("/embed", json={"sequences": ["MKV"]}, headers={"authorization": "Bearer s3cret"}).status_code == 200
    assert c.post("/embed", json={"sequences": ["MKV"]}, headers={"x-api-key": "s3cret"}).status_code == 200
    assert c.get("/readyz").status_code == 200  # health stays open (the stand-in answers every path)
    assert "API key" in c.post("/classify", json={}).json()["error"]["message"]


def test_per_residue_answers_are_bounded():
    import pytest
    from bentoml.exceptions import InvalidArgument

    from serve.service import check_answer_size

    check_answer_size(1000, 128, 128_000)
    with pytest.raises(
        InvalidArgument,
        match="a per_residue answer of 65,408 residues x 384 dims exceeds the limit of 4,194,304 values; send at most 10,922",
    ):
        check_answer_size(64 * 1022, 384, 1 << 22)


def test_unknown_fields_are_refused_by_name():
    c = TestClient(Guard(app, max_bytes=1000, fields={"/embed": {"sequences", "crop"}}))
    res = c.post("/embed", json={"sequences": ["MKV"], "cropp": True})
    assert (
        res.status_code == 400 and res.json()["error"]["message"] == "unknown field(s) ['cropp'] for /embed; it takes ['crop', 'sequences']"
    )
    assert c.post("/embed", json={"sequences": ["MKV"], "crop": True}).status_code == 200
    assert c.post("/other", json={"anything": 1}).status_code == 200  # endpoints without a field list pass


def test_every_parser_failure_is_a_400_in_one_shape_and_never_reaches_the_app():
    """Finding 1 of the hostile-client probe: a 5,000-digit integer or 1,000 levels of nesting made the parser raise
    ValueError / RecursionError, which nothing caught: the request hung for 600 s, then a plain-text 500."""
    seen.clear()
    c = client(max_bytes=100_000, api_key="k")
    h = {"content-type": "application/json", "authorization": "Bearer k"}
    digits = c.post("/classify", content=b'{"sequences": ["MKT"], "top_k": ' + b"9" * 5000 + b"}", headers=h)
    assert digits.status_code == 400 and "request body is not valid JSON" in digits.json()["error"]["message"]
    for depth in (1000, 40):
        deep = c.post("/embed", content=b"[" * depth + b"]" * depth, headers=h)
        assert deep.status_code == 400 and deep.json() == {"error": {"status": 400, "message": "request JSON nests deeper than 32 levels"}}
    health = c.post("/health", content=b"[" * 1000 + b"]" * 1000, headers={"content-type": "application/json"})  # open path
    assert health.status_code == 400
    assert c.post("/embed", content=b'{"sequences": ["MKT"', headers=h).status_code == 400
    assert c.post("/embed", content=b"\xff\xfe", headers=h).status_code == 400
    assert seen == []  # none of them reached the app
    assert c.post("/embed", content=b'{"sequences": [["M"]]}', headers=h).status_code == 200  # shallow nesting passes


def test_bearer_scheme_is_case_insensitive_and_a_401_says_which_scheme():
    c = client(api_key="s3cret")
    body = {"sequences": ["MKV"]}
    assert c.post("/embed", json=body, headers={"authorization": "bearer s3cret"}).status_code == 200
    assert c.post("/embed", json=body, headers={"authorization": "BEARER s3cret"}).status_code == 200
    refused = c.post("/embed", json=body, headers={"authorization": "s3cret"})  # no scheme: not a Bearer credential
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == 'Bearer realm="esm-distill"'


def test_answers_of_other_methods_and_paths_take_the_one_shape():
    async def routes(scope, receive, send):
        status, text = (405, b"Method Not Allowed") if scope["path"] == "/embed" else (404, b"Not Found")
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": text})

    c = TestClient(Guard(routes, max_bytes=1000))
    assert c.get("/embed").json() == {"error": {"status": 405, "message": "Method Not Allowed"}}
    assert c.get("/nowhere").json() == {"error": {"status": 404, "message": "Not Found"}}


def test_the_whole_body_has_one_deadline_so_a_dripping_client_is_cut_off():
    """Finding 5: a body dripped a byte at a time was held indefinitely (the deadline counted pauses, not the body).
    Driven as the ASGI server drives the guard: one receive() per piece, 50 ms apart."""
    import asyncio
    import time

    pieces = [bytes([b]) for b in b'{"sequences": ["MKTAYIAKQR"]}']
    sent: list[dict] = []

    async def receive():
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": pieces.pop(0), "more_body": len(pieces) > 1}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/embed", "headers": [(b"content-type", b"application/json")]}
    start = time.monotonic()
    asyncio.run(Guard(app, max_bytes=1000, body_timeout=0.5)(scope, receive, send))
    assert sent[0]["status"] == 408 and b"request body not complete within 0.5 s" in sent[1]["body"]
    assert time.monotonic() - start < 1.2  # cut at the deadline, not after the last piece (1.5 s)


def test_requests_past_the_concurrency_cap_get_503_with_retry_after_and_the_slot_comes_back(monkeypatch):
    """Finding 4: 130 concurrent requests were all taken on (and the worker's memory with them); now a worker takes
    on at most max_concurrency at once, and refuses the rest at once instead of queueing them."""
    import asyncio

    release = asyncio.Event()

    async def slow(scope, receive, send):
        await receive()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    guard = Guard(slow, max_bytes=1000, max_concurrency=2)
    scope = {"type": "http", "method": "POST", "path": "/embed", "headers": [(b"content-type", b"application/json")]}

    async def one() -> list[dict]:
        sent: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": b'{"sequences": ["MKV"]}', "more_body": False}

        async def send(message):
            sent.append(message)

        await guard(scope, receive, send)
        return sent

    async def burst():
        first = [asyncio.create_task(one()) for _ in range(2)]
        await asyncio.sleep(0.05)  # both in flight
        refused = await one()
        release.set()
        done = await asyncio.gather(*first)
        return refused, done, await one()

    import serve.guard

    trims = []
    monkeypatch.setattr(serve.guard, "release_memory", lambda: trims.append(guard.in_flight))
    refused, done, after = asyncio.run(burst())
    assert trims == [0, 0]  # the heap is trimmed each time the worker falls idle: after the burst, after the last
    assert refused[0]["status"] == 503 and (b"retry-after", b"1") in refused[0]["headers"]
    assert json.loads(refused[1]["body"])["error"]["message"].startswith("the server is busy (2 requests in flight")
    assert [d[0]["status"] for d in done] == [200, 200] and after[0]["status"] == 200 and guard.in_flight == 0
