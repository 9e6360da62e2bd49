"""The control of the sweep's fine-tuned calls: random-init students fine-tuned exactly as the grid's MLM students are.

The grid (benchmarks/sweep_datasize_calls.toml) fine-tunes each MLM-trained student on the Pfam probe half's 80% and
scores it on the other 20%. Whether MLM pre-training on this CPU's budget helps or hurts those calls needs the same
fine-tune from a random initialisation: same files, same `[finetune.pfam]` settings, same seeds.

    python benchmarks/sweep_data.py runs/sweep-data
    python benchmarks/sweep_control.py --seeds 0 1 2          # ~11 min a seed on a 2-core CPU

Finished runs are read back, interrupted ones resumed (`distill finetune --resume`).
"""

from __future__ import annotations

import argparse
import statistics
import tomllib
from pathlib import Path

from distill.recipes.finetune import finetune
from distill.recipes.sweep.finetune import scored, settings_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=Path("benchmarks/sweep_datasize_calls.toml"))
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/sweep-control"))
    args = ap.parse_args()
    settings = tomllib.loads(args.config.read_text())["finetune"]["pfam"]
    rows = []
    for seed in args.seeds:
        run = args.out / f"{args.preset}-{seed}"
        cfg = settings_of("pfam", settings, f"random:{args.preset}@{seed}", run, seed)
        if not (run / "model" / "config.json").is_file():
            if finetune(cfg, resume=(run / "checkpoint.json").is_file()).bundle is None:
                raise SystemExit(f"fine-tuning {run} was interrupted; rerun to continue it")
        m = scored(run, cfg, settings["test"])
        rows.append(m)
        print(f"random:{args.preset}@{seed}: accuracy {m['accuracy']:.3f}, macro-F1 {m['f1_macro']:.3f}", flush=True)
    for col in ("accuracy", "f1_macro"):
        vals = [r[col] for r in rows]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        print(f"{col}: " + " / ".join(f"{v:.3f}" for v in vals) + f"; mean {statistics.mean(vals):.3f} +- {sd:.3f}")


if __name__ == "__main__":
    main()
