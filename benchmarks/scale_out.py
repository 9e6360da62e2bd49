"""`distill annotate` past one process, on the same real sequences, in one run: single process vs Ray with 1 and 2
workers vs 2 scheduler shards (run side by side) + `distill merge`.

    python benchmarks/scale_out.py [--n 2000] [--preset small] [--providers cuda]

Every mode runs the real command line (a fresh process, as a user or a scheduler starts it) on a `PRESET` student
exported to ONNX (random weights: timing does not depend on training), and its TSV is compared byte for byte with the
single-process one. Columns: wall seconds of the whole command (start-up and shut-down included), times to the first
and the last TSV row, and steady-state sequences/s = sequences / (last row - first row), what a long run converges
to, with both ratios to the single process.
Then a projection for 10^8 sequences from the measured per-worker steady-state rate.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill.core.fasta import read_fasta  # noqa: E402

DISTILL = [sys.executable, "-m", "distill"]


def real_sequences(n: int) -> list[tuple[str, str]]:
    scope = REPO.parent / "shared" / "data" / "scope" / "astral-scopedom-40-2.07.shared85.fa"
    source = scope if scope.is_file() else REPO / "examples" / "train.fasta"  # the bundled sample without ../shared
    records = [(r.id, r.sequence) for r in read_fasta(source)]
    rng = np.random.default_rng(0)
    return [records[i] for i in sorted(rng.choice(len(records), min(n, len(records)), replace=False))]


def row_times(paths: list[Path], rows: int, start: float, procs: list[subprocess.Popen]) -> tuple[float, float]:
    """Seconds from ``start`` until the TSVs hold their first row, and all ``rows`` rows (polled every 10 ms)."""

    def count() -> int:
        return sum(max(p.read_bytes().count(b"\n") - 1, 0) for p in paths if p.exists())

    first = last = float("nan")
    while True:
        n, now = count(), time.perf_counter() - start
        if n >= 1 and first != first:
            first = now
        if n >= rows:
            return first, now
        if all(p.poll() is not None for p in procs):
            return first, last
        time.sleep(0.01)


def run(mode: str, cmds: list[list[str]], outputs: list[Path], rows: int) -> dict:
    start = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True) for c in cmds]
    first, last = row_times(outputs, rows, start, procs)
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"{mode} failed: {err.decode()[-2000:]}")
    return {"mode": mode, "wall": time.perf_counter() - start, "first": first, "last": last}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--chunk-records", type=int, default=100)
    ap.add_argument("--providers", default="auto", help="ONNX Runtime providers: auto, cpu, cuda, tensorrt")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    records = real_sequences(args.n)
    fasta = tmp / "in.fa"
    fasta.write_text("".join(f">{i}\n{s}\n" for i, s in records))
    graph = tmp / "m.onnx"
    subprocess.run([*DISTILL, "export", "onnx", f"random:{args.preset}", "-o", str(graph)], check=True, capture_output=True)
    cores = os.cpu_count() or 1
    base = [
        "annotate",
        str(fasta),
        "--model",
        str(graph),
        "--quiet",
        "--chunk-records",
        str(args.chunk_records),
        "--providers",
        args.providers,
    ]
    print(f"machine: {platform.machine()}, {cores} CPUs ({platform.processor() or 'cpu'}), Python {platform.python_version()}")
    print(f"input: {len(records)} real sequences, {sum(len(s) for _, s in records):,} residues; model: random:{args.preset} ONNX fp32\n")

    n, half = len(records), str(max(1, cores // 2))

    def cmd(out: str, *extra: str) -> list[str]:
        return [*DISTILL, *base, "-o", str(tmp / out), *extra]

    rows = [
        run("single process", [cmd("single.tsv", "--threads", str(cores))], [tmp / "single.tsv"], n),
        run("Ray, 1 worker", [cmd("ray1.tsv", "--ray", "local", "--workers", "1", "--threads", str(cores))], [tmp / "ray1.tsv"], n),
        run("Ray, 2 workers", [cmd("ray2.tsv", "--ray", "local", "--workers", "2", "--threads", half)], [tmp / "ray2.tsv"], n),
    ]
    shards = [cmd(f"s{i}.tsv", "--shard", f"{i}/2", "--threads", str(half)) for i in range(2)]
    row = run("2 shards side by side", shards, [tmp / "s0.tsv", tmp / "s1.tsv"], n)
    t0 = time.perf_counter()
    subprocess.run(
        [*DISTILL, "merge", str(tmp / "s0.tsv"), str(tmp / "s1.tsv"), "-o", str(tmp / "merged.tsv")], check=True, capture_output=True
    )
    row["merge"] = time.perf_counter() - t0
    row["wall"] += row["merge"]
    rows.append(row)
    outputs = {
        "single process": "single.tsv",
        "Ray, 1 worker": "ray1.tsv",
        "Ray, 2 workers": "ray2.tsv",
        "2 shards side by side": "merged.tsv",
    }
    reference = (tmp / "single.tsv").read_bytes()
    single = rows[0]
    steady_single = n / (single["last"] - single["first"])
    print("| mode | wall s | first row s | last row s | seq/s (wall) | ratio | steady seq/s | steady ratio | TSV identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        steady = n / (r["last"] - r["first"])
        same = (tmp / outputs[r["mode"]]).read_bytes() == reference
        print(f"| {r['mode']} | {r['wall']:.1f} | {r['first']:.1f} | {r['last']:.1f} | {n / r['wall']:.0f} | {single['wall'] / r['wall']:.2f} | "
              f"{steady:.0f} | {steady / steady_single:.2f} | {'yes' if same else 'NO'} |")  # fmt: skip
    print(f"\nmerge of the 2 shards: {rows[-1]['merge']:.2f} s (included in the shard row's wall time)")
    per_worker = n / (rows[1]["last"] - rows[1]["first"])
    print(f"\nprojection, 10^8 sequences of this length mix at {per_worker:.0f} seq/s per {cores}-core worker (Ray, 1 worker, steady):")
    print("| workers | hours | days |")
    print("|---|---|---|")
    for k in (1, 8, 64, 512):
        seconds = 1e8 / (per_worker * k)
        print(f"| {k} | {seconds / 3600:,.1f} | {seconds / 86400:,.2f} |")


if __name__ == "__main__":
    main()
