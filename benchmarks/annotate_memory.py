"""Peak memory of `distill annotate` as the input grows to 1M records: streaming means it stays flat.

    python benchmarks/annotate_memory.py [--sizes 10000 100000 1000000]

Writes FASTA files of real Pfam domain sequences resampled with replacement (from ../shared/data, else the
bundled sample), annotates each with a tiny ONNX model (1 layer x 32, random weights: this measures the
pipeline, not the model) in a subprocess, and prints records, wall time, records/s and the subprocess's peak
RSS (getrusage ru_maxrss).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill.core.config import ModelConfig  # noqa: E402
from distill.core.fasta import read_fasta  # noqa: E402
from distill.core.model import build_student  # noqa: E402
from export.onnx import export  # noqa: E402


def pool() -> list[str]:
    pfam = REPO.parent / "shared" / "data" / "pfam_families"
    files = sorted(pfam.glob("PF*.fasta")) if pfam.is_dir() else [REPO / "examples" / "pfam.fasta"]
    return [r.sequence for f in files for r in read_fasta(f)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="annotate-mem-"))
    graph = tmp / "tiny.onnx"
    export(build_student(ModelConfig(1, 32, 2, 64), seed=0), graph, {"source": "random"}, strict=False)
    seqs = pool()
    rng = np.random.default_rng(0)
    print(f"resampling {len(seqs)} real Pfam domains; model: 1 layer x 32 (ONNX, random weights)")
    print(f"{'records':>9s} {'FASTA MB':>9s} {'seconds':>8s} {'records/s':>10s} {'peak RSS MB':>12s}")
    for n in args.sizes:
        fasta = tmp / f"in{n}.fa"
        with open(fasta, "w") as f:
            for i, j in enumerate(rng.integers(0, len(seqs), n)):
                f.write(f">r{i}\n{seqs[j]}\n")
        code = (
            "import resource; from distill.cli.app import app\n"
            f"try: app(['annotate', {str(fasta)!r}, '--model', {str(graph)!r}, '-o', {str(tmp / f'o{n}.tsv')!r}, '--quiet'], prog_name='distill')\n"
            "except SystemExit: pass\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
        )
        start = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - start
        rows = sum(1 for _ in open(tmp / f"o{n}.tsv")) - 1
        assert rows == n, (rows, n)
        rss = int(res.stdout.split()[-1]) / 1024
        print(f"{n:9d} {fasta.stat().st_size / 1e6:9.1f} {seconds:8.1f} {n / seconds:10.0f} {rss:12.0f}", flush=True)
        fasta.unlink()


if __name__ == "__main__":
    main()
