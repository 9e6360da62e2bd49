"""Load benchmark of the BentoML service on loopback (bounded in requests and time).

    python benchmarks/serve_load.py [--presets small large] [--backends ...] [--batching on off] [--encoding json float32-base64]

For each preset (random weights: speed does not depend on training), backend (student-onnx,
student-torch), topology (one process; --batching: the model as its own service) and answer encoding (JSON
lists, float32 base64), it imports the model into a private BentoML store, starts
`distill serve`, and drives /embed at concurrency 1, 8 and 32 with requests of 1-8 real SCOPe domains
(30-400 residues, so lengths mix). It prints requests/s, sequences/s, p50/p95/p99 latency and errors, and the
same requests embedded in-process by the same backend (no HTTP, one after another), so the HTTP overhead shows as
ratios of throughput (in-process and HTTP in 4 alternating windows per level) and of single-client p50 latency (one client:
blocks of 25 requests in-process and over HTTP in turn, so both p50s are of the same requests at nearly the same
moment; errors there stop the run). Clients keep one connection each (keep-alive), as bentoml's SyncHTTPClient
does. --hog N runs N busy loops on the same cores meanwhile (in-process windows included): a load test, not a
speed figure. The server's --max-concurrency is set to the highest level driven, so the figures are of throughput,
not of the cap's 503s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill.core.bundle import save_bundle  # noqa: E402
from distill.core.config import ModelConfig  # noqa: E402
from distill.core.fasta import read_fasta  # noqa: E402
from distill.core.model import build_student  # noqa: E402


def sequences() -> list[str]:
    scope = REPO.parent / "shared" / "data" / "scope" / "astral-scopedom-40-2.07.shared85.fa"
    source = scope if scope.is_file() else REPO / "export" / "parity.fasta"
    return [r.sequence for r in read_fasta(source) if 30 <= len(r.sequence) <= 400][:2000]


def requests_of(seqs: list[str], n: int, seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [[seqs[i] for i in rng.choice(len(seqs), rng.integers(1, 9))] for _ in range(n)]


class Client:
    """One keep-alive connection per client thread, as bentoml's SyncHTTPClient, requests.Session or httpx keep one
    (a new TCP connection per request would add its setup to every latency)."""

    def __init__(self, url: str):
        self.netloc = urllib.parse.urlsplit(url).netloc
        self.conn = http.client.HTTPConnection(self.netloc, timeout=300)

    def post(self, path: str, payload: dict) -> None:
        body = json.dumps(payload).encode()
        for retry in (False, True):
            try:
                self.conn.request("POST", path, body, {"Content-Type": "application/json"})
                r = self.conn.getresponse()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):  # an idle connection the server closed
                if retry:
                    raise
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.netloc, timeout=300)
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {data[:120]!r}")


def drive(url: str, reqs: list[list[str]], concurrency: int, seconds: float, encoding: str = "json") -> dict:
    latencies, errors, done_seqs = [], 0, 0
    kinds: dict[str, int] = {}
    stop = time.perf_counter() + seconds
    index = iter(range(len(reqs)))

    def worker() -> None:
        nonlocal errors, done_seqs
        client = Client(url)
        for i in index:
            if time.perf_counter() > stop:
                return
            t0 = time.perf_counter()
            try:
                client.post("/embed", {"sequences": reqs[i], "encoding": encoding})
                latencies.append(time.perf_counter() - t0)
                done_seqs += len(reqs[i])
            except Exception as e:  # counted and classified, never hidden
                errors += 1
                kind = f"{type(e).__name__}: {str(e)[:120]}"
                kinds[kind] = kinds.get(kind, 0) + 1

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return summary([np.array(latencies) * 1000], done_seqs, time.perf_counter() - start, errors, kinds)


def summary(latencies: list[np.ndarray], seqs: int, wall: float, errors: int, kinds: dict[str, int]) -> dict:
    lat = np.concatenate(latencies)
    return {"requests": len(lat), "req_s": len(lat) / wall, "seq_s": seqs / wall, "p50": float(np.percentile(lat, 50)),
            "p95": float(np.percentile(lat, 95)), "p99": float(np.percentile(lat, 99)), "max": float(lat.max()),
            "errors": errors, "error_kinds": kinds, "latencies": lat, "seqs": seqs, "wall": wall}  # fmt: skip


def alternating(embedder, url: str, reqs: list[list[str]], concurrency: int, seconds: float, encoding: str, rounds: int = 4) -> dict:
    """Throughput in ``rounds`` alternating windows, in-process then over HTTP, ``seconds / rounds`` each: this VM's
    speed drifts by up to 2x within minutes, and alternating puts the drift on both sides of the ratio alike."""
    local, parts = [], []
    for _ in range(rounds):
        local.append(in_process(embedder, reqs, seconds / rounds))
        parts.append(drive(url, reqs, concurrency, seconds / rounds, encoding))
    kinds = sum((Counter(p["error_kinds"]) for p in parts), Counter())
    merged = summary([p["latencies"] for p in parts], sum(p["seqs"] for p in parts), sum(p["wall"] for p in parts),
                     sum(p["errors"] for p in parts), dict(kinds))  # fmt: skip
    return merged | {"in_seq_s": sum(w["seqs"] for w in local) / sum(w["wall"] for w in local)}


def in_process(embedder, reqs: list[list[str]], seconds: float) -> dict:
    """The same requests through the same backend object, one after another, for ``seconds``: sequences/s, p50 ms per
    request, requests done (the single HTTP client then sends exactly these, so the two p50s are of the same set)."""
    seqs, start, latencies = 0, time.perf_counter(), []
    for r in reqs:
        t = time.perf_counter()
        embedder.embed(r)
        latencies.append(time.perf_counter() - t)
        seqs += len(r)
        if time.perf_counter() - start > seconds:
            break
    wall = time.perf_counter() - start
    return {"seq_s": seqs / wall, "p50": float(np.percentile(np.array(latencies) * 1000, 50)), "requests": len(latencies),
            "seqs": seqs, "wall": wall}  # fmt: skip


def paired(embedder, url: str, reqs: list[list[str]], encoding: str, block: int = 25) -> dict:
    """One client: blocks of ``block`` requests in-process and then the same block over HTTP, alternately, so a drift
    of the machine's speed (this VM's in-process p50 moves by up to 25% between runs) falls on both sides alike.
    Blocks, not single requests: ONNX Runtime's threads spin for a while after each call and would slow the other
    side's next call."""
    client, local, remote, seqs = Client(url), [], [], 0
    for start in range(0, len(reqs), block):
        part = reqs[start : start + block]
        for r in part:
            t = time.perf_counter()
            embedder.embed(r)
            local.append(time.perf_counter() - t)
        for r in part:
            t = time.perf_counter()
            client.post("/embed", {"sequences": r, "encoding": encoding})
            remote.append(time.perf_counter() - t)
            seqs += len(r)
    lat = np.array(remote) * 1000
    return summary([lat], seqs, lat.sum() / 1000, 0, {}) | {"in_p50": float(np.percentile(np.array(local) * 1000, 50))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tag: str, env: dict[str, str], extra: list[str]) -> tuple[subprocess.Popen, str]:
    """`distill serve TAG` on a free loopback port, in its own process group; returns once /readyz answers 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "distill", "serve", tag, "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if urllib.request.urlopen(f"{url}/readyz", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    return proc, url


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["small", "large"])
    ap.add_argument("--backends", nargs="+", default=["student-onnx", "student-torch"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=8.0, help="per concurrency level")
    ap.add_argument("--max-requests", type=int, default=2000, help="per concurrency level")
    ap.add_argument("--batching", nargs="+", default=["on", "off"], choices=["on", "off"])
    ap.add_argument("--encoding", nargs="+", default=["json", "float32-base64"], choices=["json", "float32-base64"])
    ap.add_argument("--hog", type=int, default=0, help="busy-loop processes on the same cores while the clients run (a load test)")
    ap.add_argument("--variant", default="fp32", choices=["fp32", "int8"], help="student-onnx graph (int8: dynamic per-channel)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    seqs = sequences()
    reqs = requests_of(seqs, args.max_requests)
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    env = {**os.environ, "BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    os.environ["BENTOML_HOME"] = env["BENTOML_HOME"]
    from serve.store import import_model, open_stored

    print(f"{len(seqs)} SCOPe domains, requests of 1-8 sequences, {args.seconds:.0f} s or {args.max_requests} requests per level")
    print(
        f"variant: {args.variant} (student-onnx); {args.hog} busy-loop processes beside the clients"
        if args.hog
        else f"variant: {args.variant} (student-onnx)"
    )
    header = ("| preset | backend | batching | encoding | conc | req/s | seq/s | p50 ms | p95 ms | p99 ms | max ms | errors | "
              "in-proc seq/s | HTTP / in-proc | in-proc p50 ms | p50 HTTP / in-proc |\n" + "|---" * 16 + "|")  # fmt: skip
    print(header)
    for preset in args.presets:
        bundle = save_bundle(tmp / preset / "student", build_student(ModelConfig.preset(preset), seed=0), preset)
        tag = import_model(str(bundle), f"bench-{preset}", int8=args.variant == "int8")
        stored = Path(__import__("bentoml").models.get(tag).path)
        for backend in args.backends:
            variant = args.variant if backend == "student-onnx" else "fp32"
            embedder = open_stored(stored, backend, variant)
            first = in_process(embedder, reqs, args.seconds)
            for batching, encoding in [(b == "on", e) for b in args.batching for e in args.encoding]:
                extra = [
                    "--backend",
                    backend,
                    "--variant",
                    variant,
                    "--max-concurrency",
                    str(max(args.concurrency)),
                ]  # throughput, not the cap
                proc, url = start_server(tag, env, extra + (["--batching"] if batching else []))
                hogs = []
                try:
                    drive(url, reqs[:50], 4, 5)  # warm-up
                    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(args.hog)]
                    for c in args.concurrency:
                        if c == 1:
                            r = paired(embedder, url, reqs[: first["requests"]], encoding)
                            base = first["seq_s"]
                        else:
                            r = alternating(embedder, url, reqs, c, args.seconds, encoding)
                            base = r["in_seq_s"]
                        in_p50 = r.get("in_p50", first["p50"])
                        print(
                            f"| {preset} | {backend} | {'on' if batching else 'off'} | {encoding} | {c} | {r['req_s']:.1f} | {r['seq_s']:.1f} | "
                            f"{r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | {r['max']:.0f} | {r['errors']} | {base:.1f} | {r['seq_s'] / base:.2f} | "
                            f"{in_p50:.1f} | {r['p50'] / in_p50:.2f} |",
                            flush=True,
                        )
                        for kind, count in r["error_kinds"].items():
                            print(f"        {count} x {kind}")
                finally:
                    for h in hogs:
                        os.killpg(h.pid, 9)
                    os.killpg(proc.pid, 15)
                    proc.wait(timeout=60)


if __name__ == "__main__":
    main()
