"""Alignment re-ranking of embedding neighbours: the learned embedding prefilters, Smith-Waterman decides.

An index built with ``--align N`` answers a query by aligning it (local, BLOSUM62, gap open 11 / extend 1, the
BLAST defaults; pyopal's SIMD Smith-Waterman) to its N nearest references by cosine similarity, and ordering those
by alignment score. This is the PLMSearch / bio-embeddings-prefilter design: the embedding cuts the references to
align from all of them to N, so the cost per query stays flat as the reference set grows, while remote homologues
that a weak embedding ranks 2nd-200th are still found. The call's threshold is on the raw alignment score,
calibrated like the cosine one (leave-one-out over the references + shuffled negatives).
"""

from __future__ import annotations

import numpy as np

MATRIX, GAP_OPEN, GAP_EXTEND = "BLOSUM62", 11, 1


def _pyopal():
    try:
        import pyopal
    except ImportError as e:  # optional: esm-distill[index]
        raise ImportError("alignment re-ranking needs pyopal: pip install 'esm-distill[index]'") from e
    return pyopal


class Aligner:
    """Smith-Waterman scores of a query against chosen references (one pyopal database, subsets per query)."""

    def __init__(self, sequences: list[str], threads: int = 0):
        self.pyopal = _pyopal()
        self.db = self.pyopal.Database(sequences)
        self.threads = threads

    def scores(self, query: str, targets: np.ndarray) -> np.ndarray:
        sub = self.db.extract([int(t) for t in targets])
        hits = self.pyopal.align(query, sub, MATRIX, gap_open=GAP_OPEN, gap_extend=GAP_EXTEND, threads=self.threads, ordered=True)
        return np.array([h.score for h in hits], dtype=np.float32)


def rerank(aligner: Aligner, queries: list[str], candidates: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, its candidate references (indices, any number >= k) ordered by alignment score: (indices [n, k],
    scores [n, k])."""
    order_idx = np.zeros((len(queries), k), dtype=np.int64)
    order_scores = np.zeros((len(queries), k), dtype=np.float32)
    for q, (seq, cand) in enumerate(zip(queries, candidates, strict=True)):
        s = aligner.scores(seq, cand)
        best = np.argsort(-s, kind="stable")[:k]
        order_idx[q], order_scores[q] = cand[best], s[best]
    return order_idx, order_scores
