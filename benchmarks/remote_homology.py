"""Remote homologues: do an index's calls keep their precision on queries whose superfamily it has never seen?

    python benchmarks/remote_homology.py OUT [--model random:small] [--align 200]

SCOPe 2.07 (../shared/data/scope): in every fold with at least two superfamilies, the superfamilies are split in
two halves (seed 0). The index holds the domains of one half (and of every single-superfamily fold), labelled by
fold; the queries are the domains of the other half, whose superfamily is absent from the references. A call is
right when it names the query's fold: SCOP puts superfamilies of one fold together by structure, not by evident
homology, so a sequence method should mostly say nothing here, and what it does call should be right. Prints calls,
precision (right / calls) and the share of queries called, and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCOPE = REPO.parent / "shared" / "data" / "scope" / "astral-scopedom-40-2.07.shared85.fa"


def read_scope() -> list[tuple[str, str, str]]:
    out, head, seq = [], None, []
    for line in SCOPE.read_text().splitlines():
        if line.startswith(">"):
            if head:
                out.append((*head, "".join(seq).upper()))
            parts = line[1:].split()
            head, seq = (parts[0], parts[1]), []
        else:
            seq.append(line.strip())
    if head:
        out.append((*head, "".join(seq).upper()))
    return out


def split(out: Path) -> tuple[Path, Path, dict[str, str]]:
    domains = read_scope()
    by_fold = defaultdict(set)
    for _, sccs, _ in domains:
        by_fold[".".join(sccs.split(".")[:2])].add(".".join(sccs.split(".")[:3]))
    rng = np.random.default_rng(0)
    held = set()
    for _fold, sfs in sorted(by_fold.items()):
        if len(sfs) >= 2:
            order = sorted(sfs)
            rng.shuffle(order)
            held |= set(order[: len(order) // 2])
    refs, queries, truth = [], [], {}
    for did, sccs, seq in domains:
        fold, sf = ".".join(sccs.split(".")[:2]), ".".join(sccs.split(".")[:3])
        if sf in held:
            queries.append(f">{did}\n{seq}\n")
            truth[did] = fold
        else:
            refs.append(f">{did} {fold}\n{seq}\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "refs.fasta").write_text("".join(refs))
    (out / "queries.fasta").write_text("".join(queries))
    return out / "refs.fasta", out / "queries.fasta", truth


def distill(*args: str) -> None:
    print("$ distill " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "distill", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="random:small")
    ap.add_argument("--align", type=int, default=200)
    a = ap.parse_args()
    refs, queries, truth = split(a.out)
    index, calls = a.out / "index", a.out / "calls.tsv"
    if not (index / "index.json").is_file():
        distill("index", a.model, "--data", str(refs), "--task", "fold", "--align", str(a.align), "-o", str(index))
    if not calls.is_file():
        distill("annotate", str(queries), "--model", a.model, "--reference", str(index), "-o", str(calls), "--quiet")
    with open(calls) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    made = [r for r in rows if r["ref_call"] not in ("-", "")]
    right = sum(r["ref_call"] == truth[r["id"]] for r in made)
    related = sum(bool(r.get("ref_related_to")) for r in rows)
    res = {"queries": len(rows), "calls": len(made), "right": right, "precision": right / max(len(made), 1),
           "called_share": len(made) / max(len(rows), 1), "related": related}  # fmt: skip
    (a.out / "results.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
