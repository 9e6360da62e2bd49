"""How a fine-tuned head sees a whole protein, on the development proteome (the measurement behind distill.inference.scan).

    python benchmarks/head_windows.py BUNDLE [--proteome runs/proteome] [--limit 1500] [--windows 96,128,192]

Needs the data and HMMER stages of benchmarks/proteome_calls.py (OUT/data/rhizobium.fasta, OUT/hmmer/rhizobium.tsv).
Prints, for the bundle's pfam head:
  1. three views of a whole protein, each protein's best label and probability: one mean embedding of the whole
     protein; residue vectors of one full pass mean-pooled over windows; each window embedded on its own (as
     ``annotate`` scans). Per view: agreement with HMMER (i-E <= 0.01) and recall of its <= 1e-5 proteins when every
     protein is called, and the most calls keeping agreement >= 0.95;
  2. the head on HMMER's own envelopes cut out (the real domains, at their boundaries);
  3. per window size, how often the window overlapping HMMER's envelope most names the family, and how sure it is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proteome_calls import DEVELOPMENT, _read_fasta, read_hmmer  # noqa: E402

from distill.inference.resolve import resolve  # noqa: E402
from distill.inference.scan import scan, spans  # noqa: E402

TASK = "pfam"


def curve(calls: list[str], score: np.ndarray, ids: list[str], truth: dict) -> str:
    lab01 = {p: {h[0] for h in truth.get(p, []) if h[1] <= 1e-2} for p in ids}
    lab5 = {p: {h[0] for h in truth.get(p, []) if h[1] <= 1e-5} for p in ids}
    assigned = [i for i, p in enumerate(ids) if lab5[p]]
    best = (0, 0.0)
    for th in np.unique(score)[::-1]:
        made = np.flatnonzero(score >= th)
        agree = np.mean([calls[i] in lab01[ids[i]] for i in made])
        if agree >= 0.95:
            best = (len(made), np.mean([score[i] >= th and calls[i] in lab5[ids[i]] for i in assigned]))
    every = np.mean([calls[i] in lab01[ids[i]] for i in range(len(ids))])
    recall = np.mean([calls[i] in lab5[ids[i]] for i in assigned])
    return f"every protein called: agreement {every:.3f}, recall {recall:.3f}; at agreement >= 0.95: {best[0]} calls, recall {best[1]:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--proteome", type=Path, default=Path("runs/proteome"))
    ap.add_argument("--limit", type=int, default=1500)
    ap.add_argument("--windows", default="96,128,192")
    a = ap.parse_args()
    inf = resolve(a.bundle, providers="cpu")
    labels = inf.labels[TASK]
    records = _read_fasta((a.proteome / "data" / f"{DEVELOPMENT}.fasta").read_text().splitlines())[: a.limit]
    ids, seqs = [h.split()[0] for h, _ in records], [s for _, s in records]
    truth = read_hmmer(a.proteome / "hmmer" / f"{DEVELOPMENT}.tsv")
    window = int(a.windows.split(",")[0])
    whole = inf.embed(seqs, "windows", per_residue=True, tasks=[TASK])
    p = np.stack([e.probabilities[TASK] for e in whole])
    print(f"{len(ids)} proteins of {DEVELOPMENT}")
    print("whole protein:   ", curve([labels[k] for k in p.argmax(1)], p.max(1), ids, truth))
    head = inf.backend.heads[TASK]
    pooled = [head.probabilities(np.stack([e.residues[x:y].mean(0) for x, y in spans(len(e.residues), window, 32)])) for e in whole]
    print("pooled residues: ", curve([labels[q.max(0).argmax()] for q in pooled], np.array([q.max() for q in pooled]), ids, truth))
    scans = scan(inf, seqs, TASK, window, 32)
    print("windows:         ", curve([labels[s.best.argmax()] for s in scans], np.array([s.best.max() for s in scans]), ids, truth))
    hits = [(s, h) for pid, s in zip(ids, seqs, strict=True) for h in truth.get(pid, []) if h[1] <= 1e-5]
    cut = inf.run([s[h[2] - 1 : h[3]] for s, h in hits], [TASK])[1][TASK]
    right = np.array([labels[k] == h[0] for k, (_, h) in zip(cut.argmax(1), hits, strict=True)])
    strong = np.array([h[1] <= 1e-20 for _, h in hits])
    print(f"HMMER envelopes cut out: {len(hits)} domains, right {right.mean():.3f} (i-E <= 1e-20: {right[strong].mean():.3f})")
    first = {pid: next(h for h in truth[pid] if h[1] <= 1e-5) for pid in ids if any(h[1] <= 1e-5 for h in truth.get(pid, []))}
    members = [i for i, pid in enumerate(ids) if pid in first]
    for w in (int(x) for x in a.windows.split(",")):
        ok, sure = [], []
        for i, s in zip(members, scan(inf, [seqs[i] for i in members], TASK, w, 32), strict=True):
            label, _, start, end = first[ids[i]]
            j = int(np.argmax([min(end, y) - max(start, x + 1) for x, y in s.spans]))
            ok.append(labels[s.probabilities[j].argmax()] == label)
            sure.append(s.probabilities[j, labels.index(label)])
        print(f"window {w}: the window overlapping the envelope most is right {np.mean(ok):.3f}, median p(family) {np.median(sure):.3f}")


if __name__ == "__main__":
    main()
