"""How an aligning index turns Smith-Waterman scores into a call: every rule tried, scored by leave-one-out on the
SCOPe training references of benchmarks/classify_split.py (validation only: the test file is never read here).

    python benchmarks/call_rules.py --split runs/classify/split     # ~4 min on 2 CPU cores (all-against-all alignments)

Each training domain is a query against the other 6,683 (itself left out); a call is right when it names the query's
superfamily. "seen": another training domain of the query's family exists; "unseen": none (remote homology). The rule
the product uses (distill.inference.align: E-values, the vote of each label's best three) is computed by the product's own code.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import classify_split  # noqa: E402

from distill.core.labels import read_labelled  # noqa: E402
from distill.inference.align import Aligner, evidence, vote  # noqa: E402


def all_against_all(sequences: list[str], cache: Path) -> np.ndarray:
    if cache.is_file():
        return np.load(cache)
    aligner, everything = Aligner(sequences, threads=2), np.arange(len(sequences))
    t = time.perf_counter()
    scores = np.stack([aligner.scores(s, everything) for s in sequences])
    print(f"{len(sequences)}^2 alignments in {time.perf_counter() - t:.0f} s", flush=True)
    np.save(cache, scores)
    return scores


def class_sum(m: np.ndarray, y: np.ndarray, weights: tuple[float, ...], depth: int = 60) -> np.ndarray:
    """Per query, the label with the largest weighted sum of its best len(weights) scores among the top ``depth``."""
    top = np.argsort(-m, 1)[:, :depth]
    calls = np.empty(len(m), dtype=y.dtype)
    for i, row in enumerate(top):
        totals: dict[int, float] = {}
        count: Counter = Counter()
        for j in row:
            if count[y[j]] < len(weights):
                totals[y[j]] = totals.get(y[j], 0.0) + weights[count[y[j]]] * m[i, j]
                count[y[j]] += 1
        calls[i] = max(totals, key=totals.__getitem__)
    return calls


def product_vote(e: np.ndarray, labels: list[str]) -> np.ndarray:
    out = []
    for row in e:
        order = np.argsort(-row, kind="stable")[:60]
        out.append(vote([labels[j] for j in order], row[order])[0])
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", type=Path, default=Path("runs/classify/split"))
    args = ap.parse_args()
    if not (args.split / "split.json").is_file():
        sys.argv = ["classify_split", str(args.split)]
        classify_split.main()
    train = read_labelled(str(args.split / "scope_train.fa"), "scope")
    seqs = [s.upper() for s in train.sequences]
    s = all_against_all(seqs, args.split / "scope_train_sw.npy").astype(np.float64)
    selfs, lengths = np.diag(s).copy(), np.array([len(q) for q in seqs], dtype=np.float64)
    np.fill_diagonal(s, -np.inf)  # leave one out
    labels = np.array(train.labels)
    family = np.array([g.split()[0] if g else "" for g in train.groups])
    seen = np.array([n > 1 for n in map(Counter(family).__getitem__, family)])
    e = np.stack([evidence(row, len(q), lengths) for row, q in zip(s, seqs, strict=True)])
    np.fill_diagonal(e, -np.inf)
    top1 = lambda m: labels[np.argmax(m, 1)]  # noqa: E731
    rules = {
        "raw score, top 1 (nearest neighbour)": lambda: top1(s),
        "score / sqrt(self-scores), top 1": lambda: top1(s / np.sqrt(np.outer(selfs, selfs))),
        "score / larger self-score, top 1": lambda: top1(s / np.maximum.outer(selfs, selfs)),
        "score - 6 ln(reference length), top 1": lambda: top1(s - 6 * np.log(lengths)[None]),
        "-ln E, top 1": lambda: top1(e),
        "raw score, sum of each label's best 2": lambda: class_sum(s, labels, (1, 1)),
        "raw score, best 3 weighted 1, 1/2, 1/4": lambda: class_sum(s, labels, (1, 0.5, 0.25)),
        "-ln E, sum of each label's best 2": lambda: class_sum(e, labels, (1, 1)),
        "-ln E, sum of each label's best 3": lambda: class_sum(e, labels, (1, 1, 1)),
        "-ln E, sum of each label's best 5": lambda: class_sum(e, labels, (1,) * 5),
        "-ln E, best 3 weighted 1, 1/2, 1/4 (the product: distill.inference.align.vote)": lambda: product_vote(e, list(labels)),
    }
    print(f"SCOPe training references: {len(labels)} ({seen.sum()} seen, {(~seen).sum()} unseen), leave-one-out accuracy\n")
    print("| rule | all | family seen | family unseen |\n|---|---|---|---|")
    for name, rule in rules.items():
        right = rule() == labels
        print(f"| {name} | {right.mean():.3f} | {right[seen].mean():.3f} | {right[~seen].mean():.3f} |", flush=True)


if __name__ == "__main__":
    main()
