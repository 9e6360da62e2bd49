"""Memory of `distill serve` at its concurrency cap, with maximal requests, and after the burst.

    python benchmarks/serve_memory.py [--preset small] [--clients 16] [--rounds 3] [--settle 20]

Starts `distill serve` of a random-weight student (ONNX Runtime, the default backend) with the default limits
(64 sequences / 65,536 residues per request, `--max-concurrency` 8), then sends ``--rounds`` bursts of
``--clients`` concurrent maximal requests: 64 sequences of 1,022 residues with `per_residue` (the largest answer
the limits allow), cropped by the server's per-residue value limit to what it takes. The memory of the whole
process tree under the server (every /proc descendant: the BentoML worker does the work) is sampled every 50 ms.
Prints: RSS at idle, the peak during the bursts, RSS ``--settle`` seconds after the last burst, answers by status
(200s and the cap's 503s), and the size of one maximal JSON answer. One run, one machine: a figure to size the cap
by, not a guarantee.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serve_load import start_server  # noqa: E402

from distill.core.bundle import save_bundle  # noqa: E402
from distill.core.config import ModelConfig  # noqa: E402
from distill.core.model import build_student  # noqa: E402


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and every process below it (read from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            rss = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS:"))
            total += int(rss.split()[1]) * 1024
        except (OSError, StopIteration):
            continue
    return total


def post(url: str, body: bytes) -> tuple[int, int]:
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, len(r.read())
    except urllib.error.HTTPError as e:
        return e.code, len(e.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settle", type=float, default=20.0)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="serve-memory-"))
    env = {**os.environ, "BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    os.environ["BENTOML_HOME"] = env["BENTOML_HOME"]
    from serve.store import import_model

    bundle = save_bundle(tmp / "student", build_student(ModelConfig.preset(a.preset), seed=0), a.preset)
    tag = import_model(str(bundle), f"memory-{a.preset}")
    proc, url = start_server(tag, env, [])
    try:
        rng = np.random.default_rng(0)
        letters = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
        seqs = ["".join(rng.choice(letters, 1022)) for _ in range(64)]
        dim = ModelConfig.preset(a.preset).dim
        fit = (1 << 22) // (1022 * dim)  # sequences whose per-residue answer the value limit takes
        embed = json.dumps({"sequences": seqs[:fit], "per_residue": True}).encode()
        pooled = json.dumps({"sequences": seqs}).encode()
        post(f"{url}/embed", pooled)  # warm-up
        idle = tree_rss(proc.pid)
        peak, stop = [idle], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak.append(tree_rss(proc.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        statuses: Counter = Counter()
        for _ in range(a.rounds):
            bodies = [embed if i % 2 == 0 else pooled for i in range(a.clients)]
            with ThreadPoolExecutor(a.clients) as pool:
                for status, _ in pool.map(lambda b: post(f"{url}/embed", b), bodies):
                    statuses[status] += 1
        stop.set()
        sampler.join()
        time.sleep(a.settle)
        after = tree_rss(proc.pid)
        one = post(f"{url}/embed", embed)
        mb = 1 << 20
        print(f"preset {a.preset}; {a.rounds} bursts of {a.clients} concurrent requests (half per_residue: {fit} x 1,022 residues, "
              f"half pooled: 64 x 1,022); --max-concurrency 8 (default)")  # fmt: skip
        print(f"RSS of the server's process tree: idle {idle / mb:,.0f} MB, peak {max(peak) / mb:,.0f} MB, "
              f"{a.settle:.0f} s after the last burst {after / mb:,.0f} MB")  # fmt: skip
        print(f"answers: {dict(sorted(statuses.items()))}; one maximal per_residue JSON answer: {one[1] / mb:.1f} MB ({one[1]:,} bytes)")
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
