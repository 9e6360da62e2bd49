"""Score a `distill annotate` TSV against true labels: accuracy of every call column, with and without the no-call.

    python benchmarks/score_calls.py CALLS.tsv LABELLED --task pfam|scope

For each ``<task>_label_1`` and ``ref_call`` column: calls made (not ``-``), precision of those calls, coverage (right
calls / all records), and the top-1 accuracy if the no-call were ignored (for the index: ``ref_label_1``, its most
significant neighbour, which the vote of ``ref_call`` may overrule).
"""

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.core.labels import read_labelled  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("calls", type=Path)
    ap.add_argument("labelled")
    ap.add_argument("--task", required=True)
    args = ap.parse_args()
    ds = read_labelled(args.labelled, args.task)
    truth = dict(zip(ds.ids, ds.labels, strict=True))
    with open(args.calls) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    missing = [r["id"] for r in rows if r["id"] not in truth]
    if missing:
        sys.exit(f"{len(missing)} ids of {args.calls} have no label in {args.labelled} (first: {missing[0]})")
    pairs = [(f"{args.task}_label_1", f"{args.task}_label_1"), ("ref_call", "ref_label_1")]
    print(f"{len(rows)} records of {args.calls}")
    print("| column | calls made | precision of calls | coverage (right calls / records) | top-1 accuracy ignoring the no-call |")
    print("|---|---|---|---|---|")
    for called, raw in pairs:
        if not rows or called not in rows[0]:
            continue
        made = [r for r in rows if r[called] != "-"]
        right = sum(r[called] == truth[r["id"]] for r in made)
        top1 = sum(r[raw] == truth[r["id"]] for r in rows) if raw != called else None
        if top1 is None:
            top1 = "(the label column is '-' below the threshold)"
        else:
            top1 = f"{top1 / len(rows):.3f}"
        print(f"| {called} | {len(made)} | {right / max(len(made), 1):.3f} | {right / len(rows):.3f} | {top1} |")


if __name__ == "__main__":
    main()
