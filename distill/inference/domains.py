"""Domains inside a protein: where the reference hits sit on the query, grouped into regions, each region called.

Pfam families are domains, and users annotate full-length proteins, where a family may occur twice or beside others.
hmmscan's domain table answers with one row per domain and its coordinates; this is the index's answer. The
strongest hits of a query (already aligned for its call) are re-aligned with coordinates (``Aligner.spans``), then
read in order of evidence: a hit whose query span overlaps a region found before by at least half (of the shorter
span) joins that region, any other hit starts a new one. A region's call is the vote of its own hits (the same
rule as the protein's call, ``distill.inference.align.decide``), its coordinates those of the called label's strongest
hit in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distill.inference.align import decide

MAX_SPANS = 24  # strongest hits per query re-aligned for coordinates (full alignments cost more than scores)
MIN_EVIDENCE = -np.log(10.0)  # hits weaker than E = 10 place nothing
SAME_REGION = 0.5  # overlap (of the shorter span) for a hit to join a region


@dataclass
class Domain:
    start: int  # 1-based inclusive, on the query
    end: int
    label: str  # the region's vote
    score: float  # the vote's evidence (-ln E): what a label's threshold applies to
    ref: int  # the strongest hit: reference index, its span on the reference, its E-value
    ref_start: int
    ref_end: int
    evalue: float


def overlap(a: tuple[int, int], b: tuple[int, int]) -> float:
    """Shared residues of two inclusive spans over the shorter one's length."""
    shared = min(a[1], b[1]) - max(a[0], b[0]) + 1
    return max(shared, 0) / max(min(a[1] - a[0], b[1] - b[0]) + 1, 1)


def segment(spans: np.ndarray, labels: list[str], evidence: np.ndarray, refs: np.ndarray, references: int) -> list[Domain]:
    """Regions of one query from its hits (``evidence`` in descending order, -ln E over ``references``; ``spans``
    [n, 4] as ``Aligner.spans``), ordered along the query."""
    regions: list[list[int]] = []
    for i in range(len(evidence)):
        span = (int(spans[i, 0]), int(spans[i, 1]))
        home = next((r for r in regions if overlap(span, (int(spans[r[0], 0]), int(spans[r[0], 1]))) >= SAME_REGION), None)
        if home is None:
            regions.append([i])
        else:
            home.append(i)
    out = []
    for r in regions:
        label, score, _ = decide([labels[i] for i in r], evidence[r], references)
        best = next(i for i in r if labels[i] == label)
        s = spans[best]
        out.append(Domain(int(s[0]), int(s[1]), label, score, int(refs[best]), int(s[2]), int(s[3]),
                          float(np.exp(-evidence[best]))))  # fmt: skip
    return sorted(out, key=lambda d: d.start)
