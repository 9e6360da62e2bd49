"""End-to-end latency of a small job: `distill annotate` of 50 sequences with the small ONNX model, and `distill --help`.

    python benchmarks/annotate_startup.py [--repo PATH] [--runs 3]

What a user waits for from the command line to the last TSV row: interpreter start, imports, graph load, 50
real sequences (the bundled examples/valid.fasta), TSV + nothing else. The small preset (random weights; timing
does not depend on training) is exported once, outside the timing. ``--repo`` times another checkout of the
project (e.g. an older commit in a `git worktree`) with this interpreter, for before/after figures; whether
torch was imported on the way is reported too (the ONNX path should not need it). Goal: <= 3 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], repo: Path, runs: int) -> tuple[float, float]:
    """(median, min) wall seconds of ``cmd`` run from ``repo``."""
    env = {**os.environ, "PYTHONPATH": str(repo)}
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", type=Path, default=HERE, help="checkout to time (default: this one)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    repo = args.repo.resolve()
    sys.path.insert(0, str(HERE))
    import torch

    from distill.core.config import ModelConfig
    from distill.core.model import build_student
    from export.onnx import export

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        graph = tmp / "small.onnx"
        export(build_student(ModelConfig.preset("small"), seed=0), graph, {"source": "random:small", "preset": "small"}, strict=False)
        records = (HERE / "examples" / "valid.fasta").read_text().split(">")[1:51]
        fasta = tmp / "in.fa"
        fasta.write_text("".join(">" + r for r in records))
        py = sys.executable
        k = 0

        def annotate_cmd() -> list[str]:
            nonlocal k
            k += 1
            return [py, "-m", "distill", "annotate", str(fasta), "-o", str(tmp / f"o{k}.tsv"), "--model", str(graph), "--quiet"]

        probe = f"import sys; sys.argv = {annotate_cmd()!r}; from distill.cli.app import main\ntry:\n main()\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
        torch_imported = subprocess.run([py, "-c", probe], cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
                                        capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]  # fmt: skip
        times = [timed(annotate_cmd(), repo, 1)[0] for _ in range(args.runs)]  # a new output file each run
        median, best = statistics.median(times), min(times)
        help_median, help_best = timed([py, "-m", "distill", "--help"], repo, args.runs)
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores; python {platform.python_version()}; "
          f"torch {torch.__version__}; repo {repo}")  # fmt: skip
    print("| command | median s | best s | goal | torch imported |")
    print("|---|---|---|---|---|")
    print(f"| `distill annotate` 50 sequences, small ONNX | {median:.2f} | {best:.2f} | <= 3 s | {torch_imported} |")
    print(f"| `distill --help` | {help_median:.2f} | {help_best:.2f} | well under 1 s | |")


if __name__ == "__main__":
    main()
