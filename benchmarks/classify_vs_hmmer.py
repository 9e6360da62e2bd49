"""Pfam / SCOPe calls of the product against the tools a biologist would use instead, on one split.

    python benchmarks/classify_vs_hmmer.py --out runs/classify [--tasks pfam scope] [--seeds 0 1 2] [--quick]

Split: benchmarks/classify_split.py (Pfam: <= 200 train / 40 test per family; SCOPe: superfamilies with >= 5
domains, <= 50 train each, test accuracy also for test domains whose family is seen / unseen in training).
Every method trains on the same training file and is scored on the same test file:

  HMMER              per class: FAMSA MSA (pyfamsa) -> hmmbuild (pyhmmer) -> hmmscan; the best-scoring profile
  Smith-Waterman NN  pyopal, BLOSUM62, gap open 11 / extend 1; the best-scoring training sequence
  SW E-value vote    the same alignments, the product's call rule (distill.inference.align: E-values, the vote of each class's
                     best three): what the reference index would reach if its prefilters missed nothing
  linear probe       the old product path: softmax regression on frozen random-init `small` embeddings
  fine-tuned small   `distill finetune random:small@SEED` (one row per seed, summarised as mean +- sd)
  fine-tuned medium  `distill finetune random:medium@SEED` (Pfam; one row per seed, summarised)
  task distillation  small@SEED fine-tuned with the fine-tuned medium of the same seed as teacher (lam 0.5, T 2),
                     and its paired difference to the small student of that seed alone
  reference index    `distill index` over the fine-tuned small encoder: nearest reference by cosine, and with
                     `--align 200` (Smith-Waterman re-ranking of the 200 nearest)

No-call: "coverage at 99% precision" sweeps a threshold over each method's top score on the test pool (test
sequences + negatives: residue-shuffled test sequences for Pfam, real SCOPe domains of superfamilies outside the
label set for SCOPe) and reports the largest share of test sequences called correctly while precision >= 0.99; the
product rows also report precision and coverage at their own calibrated threshold (chosen on validation data only).
Every choice of configuration was made before the test set was scored; nothing here is tuned on it.

Prediction speed at Pfam-A size (20,000 families): hmmscan and nearest-neighbour cost grow with the number of
profiles / references, so their measured seq/s is scaled by 54 / 20,000; a fine-tuned head adds dim x classes
multiply-adds to a fixed encoder cost (counted exactly); the index's flat search is scaled by the reference count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import classify_methods as methods  # noqa: E402
import classify_split  # noqa: E402

from distill.core.calibration import shuffled  # noqa: E402
from distill.core.labels import read_labelled  # noqa: E402
from distill.recipes.sweep.stats import t_interval  # noqa: E402

PFAM_A = 20_000
N_NEGATIVES = 500


def load_task(split: Path, task: str, seed: int) -> dict:
    suffix = "fasta" if task == "pfam" else "fa"
    train = read_labelled(str(split / f"{task}_train.{suffix}"), task)
    test = read_labelled(str(split / f"{task}_test.{suffix}"), task)
    rng = np.random.default_rng(seed)
    if task == "pfam":
        pick = rng.permutation(len(test))[:N_NEGATIVES]
        negatives = shuffled([test.sequences[i] for i in sorted(pick)], seed)
    else:
        outside = [r.sequence.upper() for r in classify_split.iter_records(split / "scope_outside.fa", warn_duplicates=False)]
        negatives = [outside[i] for i in sorted(rng.permutation(len(outside))[:N_NEGATIVES])]
    seen = json.loads((split / "split.json").read_text())["scope_test_seen"] if task == "scope" else None
    return {
        "task": task,
        "train": train,
        "test": test,
        "negatives": negatives,
        "seen": seen,
        "train_path": str(split / f"{task}_train.{suffix}"),
    }


def rows_for(d: dict, rows_dir: Path) -> Path:
    """``rows_dir``, tied to this split: rows computed on another split (other data, --quick) are refused, not mixed in."""
    digest = hashlib.sha256()
    for ds in (d["train"], d["test"]):
        for label, seq in zip(ds.labels, ds.sequences, strict=True):
            digest.update(f"{label}\t{seq}\n".encode())
    rows_dir.mkdir(parents=True, exist_ok=True)
    stamp = rows_dir / "split.sha256"
    if not stamp.is_file():
        stamp.write_text(digest.hexdigest() + "\n")
    elif stamp.read_text().strip() != digest.hexdigest():
        raise SystemExit(f"{rows_dir} holds rows of another split (split.sha256 differs); give another --rows or --out")
    return rows_dir


def score(name: str, result: methods.Result, d: dict, classes: int) -> dict:
    """Accuracy, macro-F1, seen/unseen accuracy, coverage at 99% precision (swept and calibrated), speeds."""
    from distill.core.calibration import threshold_for_precision
    from distill.recipes.probe import classification_metrics

    truth = d["test"].labels
    m = classification_metrics(truth, result.pred)
    correct = np.array([p == t for p, t in zip(result.pred, truth, strict=True)])
    pool = np.r_[result.scores, result.negative_scores]
    swept = threshold_for_precision(pool, np.r_[correct, np.zeros(len(result.negative_scores), bool)], 0.99, len(truth))
    row = {"method": name, "accuracy": m["accuracy"], "f1_macro": m["f1_macro"], "coverage_p99": swept.coverage,
           "train_s": result.train_seconds, "seq_per_s": len(truth) / result.predict_seconds,
           "seq_per_s_pfam_a": len(truth) / result.predict_seconds * result.scale_to(PFAM_A, classes)}  # fmt: skip
    row |= result.extra
    if d["seen"] is not None:
        seen = np.array([d["seen"][i] for i in d["test"].ids])
        row |= {"accuracy_seen": float(correct[seen].mean()), "accuracy_unseen": float(correct[~seen].mean())}
    if result.threshold is not None:
        called = result.scores >= result.threshold
        wrong_neg = int((result.negative_scores >= result.threshold).sum())
        calls = int(called.sum()) + wrong_neg
        row |= {"calibrated_precision": float((correct & called).sum() / calls) if calls else 1.0,
                "calibrated_coverage": float((correct & called).mean())}  # fmt: skip
    return row


def run_task(d: dict, out: Path, seeds: list[int], quick: bool, rows_dir: Path, only: list[str] | None = None) -> list[dict]:
    """Every method's row, each computed once: a row whose JSON is in ``rows_dir`` is read, not recomputed; with
    ``only``, methods whose name starts with none of them are not computed (their kept rows are still read)."""
    task, classes = d["task"], len(set(d["train"].labels))
    out.mkdir(parents=True, exist_ok=True)
    plan: list[tuple[str, object]] = [
        ("HMMER (FAMSA + hmmbuild + hmmscan)", lambda: methods.hmmer(d)),
        ("Smith-Waterman nearest neighbour", lambda: methods.nearest_neighbour(d)),
        ("Smith-Waterman, every reference, E-value vote", lambda: methods.nearest_neighbour(d, vote=True)),
        ("linear probe, random-init small", lambda: methods.linear_probe(d, out)),
    ]
    ft = methods.finetune_settings(task, quick)
    for seed in seeds:
        plan.append(
            (f"fine-tuned small, seed {seed}", lambda s=seed: methods.finetuned(d, out / f"small-{s}", f"random:small@{s}", s, ft["small"]))
        )
    for seed in seeds if ft.get("medium") else []:  # the teacher of seed S is the medium of seed S: independent replicates
        plan.append(
            (
                f"fine-tuned medium, seed {seed}",
                lambda s=seed: methods.finetuned(d, out / f"medium-{s}", f"random:medium@{s}", s, ft["medium"]),
            )
        )
        plan.append((f"task distillation medium -> small, seed {seed}",
                     lambda s=seed: methods.finetuned(d, out / f"distilled-{s}", f"random:small@{s}", s, ft["small"], teacher=out / f"medium-{s}" / "model")))  # fmt: skip
    plan.append(
        ("reference index (fine-tuned small, cosine)", lambda: methods.reference(d, out / "index", out / f"small-{seeds[0]}" / "model", 0))
    )
    encoders = [("", out / f"small-{seeds[0]}" / "model", "index-align"), (" over random-init small", "random:small", "index-random-align")]
    for label, encoder, directory in encoders:  # embedding candidates only (--no-kmer), then with the 3-mer ones (the default)
        plan.append(
            (f"reference index{label} + re-rank of 200", lambda e=encoder, p=directory: methods.reference(d, out / p, e, 200, False))
        )
        plan.append(
            (
                f"reference index{label} + re-rank of 200 + 200 by 4-mers",
                lambda e=encoder, p=directory: methods.reference(d, out / f"{p}-kmer4", e, 200),
            )
        )
    # SCOPe: the candidate count as a knob (more candidates, slower; all = exhaustive alignment). Pfam's index is
    # at 0.999 with 200 already.
    for n in (1000, len(d["train"])) if task == "scope" else ():
        label = "every reference aligned" if n == len(d["train"]) else f"re-rank of {n} + {n} by 4-mers"
        plan.append(
            (
                f"reference index over random-init small, {label}",
                lambda n=n: methods.reference(d, out / f"index-random-{n}", "random:small", n),
            )
        )
    rows = []
    for name, fn in plan:
        cache = rows_dir / row_file(name)
        if cache.is_file():
            rows.append(json.loads(cache.read_text()))
            continue
        if only and not name.startswith(tuple(only)):
            continue
        t = time.perf_counter()
        row = score(name, fn(), d, classes)
        cache.write_text(json.dumps(row))
        print(f"[{task}] {name}: accuracy {row['accuracy']:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
        rows.append(row)
    return rows


def row_file(name: str) -> str:
    """'fine-tuned small, seed 0' -> 'fine-tuned_small_seed_0.json'; 'HMMER (FAMSA + ...)' -> 'HMMER.json'."""
    return re.sub(r"[^A-Za-z0-9-]+", "_", re.sub(r" \(.*?\)", "", name)).strip("_") + ".json"


def summarise(rows: list[dict]) -> list[dict]:
    """Seed rows of the same method -> one row of means with sd (the seed rows are kept in the JSON)."""
    out, groups = [], {}
    for r in rows:
        groups.setdefault(r["method"].split(", seed")[0], []).append(r)
    for key, rs in groups.items():
        if len(rs) == 1:
            out.append(rs[0])
            continue
        merged = {"method": f"{key} ({len(rs)} seeds)"}
        for col in rs[0]:
            if col != "method":
                vals = np.array([r[col] for r in rs], dtype=float)
                merged[col] = float(vals.mean())
                merged[col + "_sd"] = float(vals.std(ddof=1))
        out.append(merged)
    return out


def distillation_gain(rows: list[dict]) -> str:
    """Task distillation - the small student fine-tuned alone, paired by seed (same seed, same data), with a t-interval."""
    by = {r["method"]: r for r in rows}
    seeds = [m.split(", seed ")[1] for m in by if m.startswith("task distillation medium -> small, seed ")]
    pairs = [(by[f"task distillation medium -> small, seed {s}"], by.get(f"fine-tuned small, seed {s}")) for s in seeds]
    pairs = [(a, b) for a, b in pairs if b is not None]
    if len(pairs) < 2:
        return ""
    lines = [f"Task distillation - small alone, paired by seed ({len(pairs)} seeds), mean and 95% t-interval:", ""]
    for col in ("accuracy", "f1_macro", "calibrated_coverage"):
        lines.append(f"- {col}: {t_interval([a[col] - b[col] for a, b in pairs]).text(4)}")
    return "\n".join(lines) + "\n"


def table(rows: list[dict], task: str) -> str:
    cols = ["accuracy", "f1_macro"] + (["accuracy_seen", "accuracy_unseen"] if task == "scope" else [])
    cols += [
        "coverage_p99",
        "calibrated_precision",
        "calibrated_coverage",
        "leave_one_out_accuracy",
        "train_s",
        "seq_per_s",
        "seq_per_s_pfam_a",
    ]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        cells = []
        for c in cols:
            if c not in r:
                cells.append("")
            elif c.startswith(("train", "seq")):
                cells.append(f"{r[c]:,.1f}" if r[c] < 10 else f"{r[c]:,.0f}")
            else:
                cells.append(f"{r[c]:.3f}" + (f" ± {r[c + '_sd']:.3f}" if c + "_sd" in r else ""))
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/classify"))
    ap.add_argument("--tasks", nargs="+", default=["pfam", "scope"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--rows", type=Path, help="where each method's row is kept as JSON (default OUT/TASK): a directory kept "
                    "across machines (benchmarks/results/classify) lets the rows be computed over several sittings")  # fmt: skip
    ap.add_argument("--only", nargs="+", metavar="PREFIX", help="compute only the methods whose name starts with one of these "
                    "(e.g. 'reference index'); other rows are read where kept, else left out")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="a few classes and one epoch: checks the script runs, measures nothing")
    args = ap.parse_args()
    split = args.out / "split"
    if not (split / "split.json").is_file():
        sys.argv = ["classify_split", str(split)]
        classify_split.main()
    report = []
    for task in args.tasks:
        d = load_task(split, task, 0)
        if args.quick:
            d = methods.shrink(d, 6, args.out / task)
        seed_rows = run_task(d, args.out / task, args.seeds, args.quick, rows_for(d, (args.rows or args.out) / task), args.only)
        info = f"{task}: {len(set(d['train'].labels))} classes, {len(d['train'])} training, {len(d['test'])} test, {len(d['negatives'])} negatives"
        gain = distillation_gain(seed_rows)
        report.append(f"### {info}\n\n{table(summarise(seed_rows), task)}\n" + (f"\n{gain}" if gain else ""))
        (args.out / task / "results.md").write_text(report[-1])
        print(report[-1], flush=True)
    (args.out / "results.md").write_text("\n".join(report))
    print(f"wrote {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
