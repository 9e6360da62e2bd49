"""Training throughput of `distill fit` per preset: student tokens/s without and with a teacher.

    python benchmarks/fit_throughput.py [--data examples/train.fasta] [--steps 6] [--batch-size 64]

Runs the real trainer (``distill.recipes.fit.fit``) for a few optimizer steps per configuration on real
sequences and reads the tokens/s it logs itself (real residues + BOS/EOS, padding excluded), skipping
the first step (warm-up). Teachers:
  - none      --lam 0 (vanilla MLM: no teacher is loaded)
  - tiny      the bundled examples/teacher/tiny_esm1b_t4_192.pt (2.0M params)
  - t12-480   an ESM-1b-architecture model of 12 layers x 480 dim (FFN 1920, ~35M params) with
              random weights, written in fair-esm's format: a teacher this CPU can afford; ESM-1b
              itself (33 x 1280, 650M) is a GPU job.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from distill.core.config import FitConfig, ModelConfig
from distill.core.model import ESM
from distill.core.pretrained import save_fair_esm
from distill.recipes.fit import fit

REPO = Path(__file__).resolve().parents[1]


def measure(data: Path, preset: str, teacher: str | None, steps: int, batch_size: int, tmp: Path) -> dict:
    out = tmp / f"{preset}-{Path(teacher).stem if teacher else 'none'}"
    cfg = FitConfig(
        data=str(data), out=str(out), preset=preset, teacher=teacher or "unused", lam=0.5 if teacher else 0.0,
        batch_size=batch_size, epochs=1, max_steps=steps, valid_fraction=0.0, quiet=True, device="cpu",
    )  # fmt: skip
    fit(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
        "padding": statistics.mean(r["padding"] for r in rows),
        "steps": len(rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / "examples" / "train.fasta")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--presets", default="small,medium,large")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        torch.manual_seed(0)
        big, _ = save_fair_esm(ESM(ModelConfig(layers=12, dim=480, heads=20, ffn=1920)).eval(), tmp / "t12_480.pt")
        teachers = {"none": None, "tiny": str(REPO / "examples" / "teacher" / "tiny_esm1b_t4_192.pt"), "t12-480": str(big)}
        print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
        print(f"data: {args.data} | batch {args.batch_size} sequences | median of {args.steps - 1} steps after warm-up\n")
        header = (
            "| preset | params | " + " | ".join(f"tok/s teacher={t}" for t in teachers) + " | slowdown tiny | slowdown t12-480 | padding |"
        )
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        for preset in args.presets.split(","):
            results = {name: measure(args.data, preset, t, args.steps, args.batch_size, tmp) for name, t in teachers.items()}
            params = ESM(ModelConfig.preset(preset)).num_parameters()
            base = results["none"]["tokens_per_s"]
            cells = " | ".join(f"{r['tokens_per_s']:,.0f}" for r in results.values())
            print(
                f"| {preset} | {params / 1e6:.1f}M | {cells} | {base / results['tiny']['tokens_per_s']:.2f}x"
                f" | {base / results['t12-480']['tokens_per_s']:.2f}x | {results['none']['padding']:.1%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
