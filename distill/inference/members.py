"""Which proteins of a background proteome are members of a label: the stricter rule that keeps them out of its nulls.

A background proteome (``--background``) stands for "real proteins that are none of these labels", but it holds true
members too: a bacterium has its own ABC transporters and Rossmann-fold dehydrogenases. Counting them as
non-members would raise every threshold past real members (and, used as training negatives, teach a head to refuse
them). The rule that recognises them does not use the model being calibrated: a protein is a presumed member of a
label when its Smith-Waterman alignment to one of that label's labelled sequences has an E-value <= ``MEMBER_EVALUE``
over the labelled set (the search-space E-value of ``distill.inference.align``). Candidates per protein are its
``DEPTH`` nearest labelled sequences by 4-mer TF-IDF cosine (``distill.inference.kmers``): strong homologues share
words, so the rule needs no embedding. The reference index's own background calibration applies the same level to
its votes (``index_calibration.MEMBER_EVALUE``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from distill.inference.align import Aligner, evidence
from distill.inference.kmers import KmerIndex

MEMBER_EVALUE = 1e-5  # E-value over the labelled set at which a background protein is presumed a member
DEPTH = 50  # labelled sequences aligned per background protein


def strongest(
    labelled: list[str], labels: list[str], proteins: list[str], depth: int = DEPTH, progress: Callable | None = None
) -> list[dict[str, float]]:
    """Per protein, each candidate label's strongest evidence (-ln E over the labelled set); ``progress`` wraps the
    proteins' iteration (a progress bar), when given."""
    if not proteins:
        return []
    kmers, aligner = KmerIndex(labelled), Aligner(labelled)
    lengths = np.array([len(s) for s in labelled])
    out = []
    pairs = zip(proteins, kmers.search(proteins, depth), strict=True)
    for protein, cand in progress(pairs, total=len(proteins)) if progress else pairs:
        e = evidence(aligner.scores(protein, cand), len(protein), lengths[cand], len(labelled))
        best: dict[str, float] = {}
        for j, v in zip(cand, e, strict=True):
            best[labels[j]] = max(best.get(labels[j], -np.inf), float(v))
        out.append(best)
    return out


def presumed_members(
    labelled: list[str], labels: list[str], proteins: list[str], depth: int = DEPTH, progress: Callable | None = None
) -> list[set[str]]:
    """Per protein, the labels it is presumed a member of (an alignment at E <= ``MEMBER_EVALUE``)."""
    level = -np.log(MEMBER_EVALUE)
    return [{label for label, v in best.items() if v >= level} for best in strongest(labelled, labels, proteins, depth, progress)]
