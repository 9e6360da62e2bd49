"""Calibrating a reference index's calls: one threshold for a target precision, and per-label ones from a proteome.

The global threshold (``calibrate_calls``): leave-one-out calls over the references plus shuffled references and
references of left-out labels as negatives; the smallest score at which the calls reach the target precision.

Those negatives are never real proteins of other families that share a fold or a domain with a label, and a whole
proteome is mostly such proteins: relatives of a family (a Rossmann-fold dehydrogenase of another family, say) hit
its references with E-values from 1 down to about 1e-3, where weak real members sit too. Two rules keep calls apart
from them. Every aligning index calls nothing weaker than ``--max-evalue`` (0.01, HMMER's inclusion threshold), whatever
the calibration on domain pieces allows. And ``--background PROTEOME`` sets per-label thresholds from real
non-members, the way Pfam sets a gathering threshold per family above its highest-scoring non-member
(``calibrate_labels``): every protein of the background is searched and each label's vote read. The background holds
real members too, which must not count as non-members; the stricter rule that recognises them is the E-value: a
protein whose vote for a label reaches ``MEMBER_EVALUE`` (1e-5) is presumed a member and left out. A label's
threshold is raised one order of magnitude of E-value (``MARGIN``) above its strongest remaining background protein,
never past ``MEMBER_EVALUE``: so a label's member threshold lies between E 0.01 and E 1e-5, and a query with E <= 1e-5
is always called. Queries that clear the global threshold but not their label's own are reported as related. Chosen
on a development proteome with the background given (docs/results.md, "Calls on whole proteomes").
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distill.core.calibration import Threshold, shuffled, threshold_for_precision
from distill.core.config import DEFAULT_MAX_EVALUE, DEFAULT_TARGET_PRECISION
from distill.inference.index import CALL_SCORE, MAX_LEFT_OUT, MAX_NEGATIVES, N_CHECK, IndexError_, ReferenceIndex, normalise

MEMBER_EVALUE = 1e-5  # a background protein this strongly hitting a label is presumed a member, not a non-member
MARGIN = float(np.log(10.0))  # a raised threshold sits one order of magnitude of E-value above the background's best


def calibrate_calls(
    index: ReferenceIndex, negatives: list[str], negative_vectors: np.ndarray, target: float, seed: int = 0,
    max_evalue: float = DEFAULT_MAX_EVALUE,
) -> dict[str, Any]:  # fmt: skip
    """Leave-one-out calls over the references (right if the others call the reference's label) + two kinds of negatives.

    A reference whose label occurs once cannot be called right; it counts all the same, so coverage is what a query
    of a stored class would see. Negatives: shuffled references, and references of other classes, each searched with
    its whole label left out (a real protein of a class outside the index: any call is wrong; labels of more than
    ``MAX_LEFT_OUT`` references are not left out). Scores are cosine similarities, or the vote's evidence for an
    ``--align`` index, where the threshold is never below ``-ln max_evalue`` (see the module docstring).
    """
    n = len(index)
    nn = index.search(index.vectors, 1, index.sequences, exclude=[np.array([i]) for i in range(n)])
    correct = np.array([call == label for call, label in zip(nn.calls, index.labels, strict=True)])
    neg = index.search(negative_vectors, 1, negatives).call_scores if len(negatives) else np.zeros(0, np.float32)
    members: dict[str, list[int]] = {}
    for i, label in enumerate(index.labels):
        members.setdefault(label, []).append(i)
    outside = [int(i) for i in np.random.default_rng([seed, 4]).permutation(n) if len(members[index.labels[i]]) <= MAX_LEFT_OUT]
    outside = sorted(outside[:MAX_NEGATIVES]) if len(members) > 1 else []
    if outside:
        left_out = [np.array(members[index.labels[i]]) for i in outside]
        neg = np.r_[neg, index.search(index.vectors[outside], 1, [index.sequences[i] for i in outside], exclude=left_out).call_scores]
    pool, right = np.r_[nn.call_scores, neg], np.r_[correct, np.zeros(len(neg), bool)]
    th = threshold_for_precision(pool, right, target, n)
    at_target = th.threshold
    if index.align and th.threshold < -np.log(max_evalue):
        floor = float(-np.log(max_evalue))
        made = pool >= floor
        th = Threshold(floor, float(right[made].mean()) if made.any() else 1.0, float(right[made].sum()) / n, th.reached)
    return {"threshold": th.threshold, "score": CALL_SCORE if index.align else "cosine", "target_precision": target,
            "precision": th.precision, "coverage": th.coverage, "reached": th.reached,
            "leave_one_out_accuracy": float(correct.mean()), "n_negatives": len(neg) - len(outside),
            "n_outside": len(outside), **({"max_evalue": max_evalue, "target_threshold": at_target} if index.align else {})}  # fmt: skip


def calibrate_labels(index: ReferenceIndex, name: str, vectors: np.ndarray, sequences: list[str]) -> dict[str, Any]:
    """Per-label thresholds from the background proteome ``name`` (see the module docstring): the labels raised and
    what the card says about the background."""
    found = index.search(vectors, 1, sequences).votes or []
    level = float(-np.log(MEMBER_EVALUE))
    raised, presumed = {}, 0
    for label in sorted(set(index.labels)):
        b = np.array([v.get(label, -np.inf) for v in found])
        presumed += int((b >= level).sum())
        noise = b[b < level]
        if len(noise) and noise.max() + MARGIN > index.threshold:
            raised[label] = float(min(noise.max() + MARGIN, level))
    return {"labels": raised, "background": {"name": name, "proteins": len(sequences), "raised": len(raised),
            "presumed_members": presumed, "margin": MARGIN, "member_evalue": MEMBER_EVALUE}}  # fmt: skip


def build_index(
    embed_fn, ids: list[str], sequences: list[str], labels: list[str], card: dict[str, Any],  # noqa: ANN001
    previous: ReferenceIndex | None = None, target: float = DEFAULT_TARGET_PRECISION, seed: int = 0,
    vectors: np.ndarray | None = None, background: tuple[str, list[str]] | None = None,
    max_evalue: float = DEFAULT_MAX_EVALUE,
) -> ReferenceIndex:  # fmt: skip
    """Embed ``sequences`` (appended to ``previous`` when given; ``vectors`` when already embedded), then calibrate
    the call threshold, and with ``background`` (name, proteins) the labels' own."""
    if background is not None and not card.get("align", (previous.card if previous else {}).get("align")):
        raise IndexError_("--background calibrates alignment calls: build the index with --align N")
    if previous is not None and background is None and previous.card.get("calibration", {}).get("background"):
        name = previous.card["calibration"]["background"]["name"]
        raise IndexError_(f"the index's labels were calibrated against the background proteome {name}: pass --background again")
    if previous is not None:
        previous.check_model(embed_fn)
        clash = sorted(set(ids) & set(previous.ids))
        if clash:
            raise IndexError_(f"{len(clash)} ids are already in the index (first: {clash[0]!r}); ids must be unique")
        card = previous.card | {"appended": previous.card.get("appended", 0) + 1}
    vectors = normalise(embed_fn(sequences) if vectors is None else vectors)
    if previous is None:
        card = card | {"check": {"sequences": sequences[:N_CHECK], "vectors": vectors[:N_CHECK].tolist()}}
    else:
        vectors, ids, labels, sequences = (
            np.r_[previous.vectors, vectors],
            previous.ids + ids,
            previous.labels + labels,
            previous.sequences + sequences,
        )
    index = ReferenceIndex(vectors, ids, labels, sequences, card)
    pick = sorted(np.random.default_rng([seed, 3]).permutation(len(sequences))[:MAX_NEGATIVES])
    negatives = shuffled([sequences[i] for i in pick], seed)
    index.card["calibration"] = calibrate_calls(index, negatives, embed_fn(negatives), target, seed, max_evalue)
    if background is not None:
        index.card["calibration"] |= calibrate_labels(index, background[0], embed_fn(background[1]), background[1])
    index.card["labels"] = len(set(labels))
    return index
