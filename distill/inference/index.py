"""Annotation transfer from a reference index: labelled embeddings, nearest neighbours by cosine similarity.

bio_embeddings' way: embed labelled reference proteins once, then call a query by its nearest reference. A class
becomes callable by adding its sequences (``--append``), without retraining. Search is exact inner product over
L2-normalised vectors (faiss ``IndexFlatIP``): at 10^5-10^6 references a query costs milliseconds on a CPU.

INDEX/
  index.json      card: model spec, weights fingerprint, pooling, dim, count, calibration, check vectors
  vectors.npy     [n, dim] float32, L2-normalised
  entries.tsv     id<TAB>label<TAB>sequence, one line per vector, same order

``--align N`` (distill.inference.align): the N nearest references by cosine (and by shared k-mers) are aligned, ordered by the
alignment's E-value, and the call is their evidence-weighted vote; the calibrated threshold is then on its evidence.

The model check: the card keeps a few reference sequences with their vectors; a backend that embeds them
differently (cosine < 0.99, which int8 graphs of the same model pass) is another model, and is refused.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.core.errors import MissingExtra
from distill.core.io import read_json_object
from distill.inference.domains import MAX_SPANS, MIN_EVIDENCE, Domain, segment
from distill.inference.kmers import KmerIndex

FORMAT = "esm-distill-index"
N_CHECK = 8  # reference sequences kept to recognise the model
CHECK_COSINE = 0.99
MAX_NEGATIVES = 2000  # shuffled references embedded to calibrate the threshold (and as many left out with their label)
MAX_LEFT_OUT = 1000  # a label with more references is too costly to leave out of a search (depth grows with it)
CALL_SCORE = "alignment E-value"  # an --align index's calls: -ln E vote over the whole index; before: per pair, or raw scores
PART_FILE = "index-part.json"  # marks a directory as one part of a `distill index --shard I/N` job


class IndexError_(ValueError):  # noqa: N801 (``IndexError`` is a builtin)
    """A missing or corrupt index, or one used with a model it was not built with."""


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class Neighbours:
    ids: list[list[str]]
    labels: list[list[str]]
    similarities: np.ndarray  # [n, k] cosine
    calls: list[str]  # per query, the label called (before the threshold): nearest by cosine, or the alignment vote
    call_scores: np.ndarray  # [n] what the calibrated threshold applies to: cosine, or the vote's -ln E evidence
    scores: np.ndarray | None = None  # [n, k] Smith-Waterman scores when the index re-ranks by alignment
    evidence: np.ndarray | None = None  # [n, k] their -ln E-values (distill.inference.align.evidence), the order then
    votes: list[dict[str, float]] | None = None  # per query, every label's vote (aligning index)
    domains: list[list[Domain]] | None = None  # per query, its regions (``search(..., domains=True)``)


class ReferenceIndex:
    def __init__(self, vectors: np.ndarray, ids: list[str], labels: list[str], sequences: list[str], card: dict[str, Any]):
        try:
            import faiss
        except ImportError as e:  # optional: esm-distill[index]
            raise MissingExtra("reference indexes need faiss: pip install 'esm-distill[index]'") from e
        self.vectors, self.ids, self.labels, self.sequences, self.card = normalise(vectors), list(ids), list(labels), list(sequences), card
        self._faiss = faiss.IndexFlatIP(self.vectors.shape[1])
        self._faiss.add(self.vectors)
        self._aligner = None
        self._kmers: KmerIndex | None = None
        self._lengths = np.array([len(x) for x in self.sequences])

    @property
    def align(self) -> int:
        """Candidates re-ranked by alignment per query (0: calls by cosine similarity alone)."""
        return int(self.card.get("align", 0))

    @property
    def threshold(self) -> float:
        """The calibrated no-call threshold: below it no label is called (nor named as related)."""
        return float(self.card.get("calibration", {}).get("threshold", 0.0))

    def threshold_for(self, label: str) -> float:
        """A label's own threshold where a background proteome raised it (``--background``), else the global one."""
        return float(self.card.get("calibration", {}).get("labels", {}).get(label, self.threshold))

    def reported(self, domains: list[Domain]) -> list[tuple[Domain, str]]:
        """The regions worth a row, with their verdicts: those clearing the global threshold (call or related)."""
        return [(d, v) for d in domains if (v := self.verdict(d.label, d.score)) != "no-call"]

    def verdict(self, label: str, score: float) -> str:
        """call (a member), related (significant, but below the label's member threshold) or no-call."""
        if score >= self.threshold_for(label):
            return "call"
        return "related" if score >= self.threshold else "no-call"

    def __len__(self) -> int:
        return len(self.ids)

    def search(
        self, queries: np.ndarray, k: int, sequences: list[str] | None = None, exclude: list[np.ndarray] | None = None,
        domains: bool = False,
    ) -> Neighbours:  # fmt: skip
        """The k nearest references; with an ``--align`` index and the query ``sequences``, re-ranked by alignment
        (and, with ``domains``, the regions of each query: distill.inference.domains).

        ``exclude`` (calibration only): per query, reference indices never returned (itself, or its whole label).
        """
        extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
        k = min(k, len(self) - extra)
        q = normalise(queries)
        depth = min(max(k, self.align if sequences is not None else 0) + extra, len(self))
        sims, idx = self._faiss.search(q, depth)
        if exclude is not None:
            keep = [np.flatnonzero(~np.isin(row, e))[: depth - extra] for row, e in zip(idx, exclude, strict=True)]
            idx, sims = np.take_along_axis(idx, np.stack(keep), 1), np.take_along_axis(sims, np.stack(keep), 1)
        if sequences is None or not self.align:
            idx, sims = idx[:, :k], sims[:, :k]
            labels = [[self.labels[j] for j in row] for row in idx]
            return Neighbours([[self.ids[j] for j in row] for row in idx], labels, sims, [r[0] for r in labels], sims[:, 0].copy())
        return self._aligned(q, sequences, list(idx), k, exclude, domains)

    def _aligned(
        self, q: np.ndarray, sequences: list[str], candidates: list[np.ndarray], k: int, exclude: list[np.ndarray] | None,
        domains: bool = False,
    ) -> Neighbours:  # fmt: skip
        """Candidates by cosine plus those by shared k-mers, aligned and ordered by evidence; the call is their vote."""
        from distill.inference.align import Aligner, decide, rerank  # pyopal (optional extra): only when re-ranking

        self._aligner = self._aligner or Aligner(self.sequences)
        if self.card.get("kmer"):  # and the nearest by shared k-mers (distill.inference.kmers): both prefilters' candidates
            self._kmers = self._kmers or KmerIndex(self.sequences, int(self.card["kmer"]))
            near = self._kmers.search(sequences, self.align, exclude)
            candidates = [np.concatenate([c, w[~np.isin(w, c)]]) for c, w in zip(candidates, near, strict=True)]
        ranked = rerank(self._aligner, sequences, candidates, self._lengths)
        decided = [decide([self.labels[j] for j in r.idx], r.evidence, len(self)) for r in ranked]
        idx = np.stack([r.idx[:k] for r in ranked])
        labels = [[self.labels[j] for j in row] for row in idx]
        sims = (q[:, None, :] * self.vectors[idx]).sum(-1)
        regions = None
        if domains:
            regions = []
            for seq, r in zip(sequences, ranked, strict=True):
                top = r.idx[:MAX_SPANS][r.evidence[:MAX_SPANS] >= MIN_EVIDENCE]
                spans = self._aligner.spans(seq, top)
                regions.append(segment(spans, [self.labels[j] for j in top], r.evidence[: len(top)], top, len(self)))
        return Neighbours(
            [[self.ids[j] for j in row] for row in idx], labels, sims, [d[0] for d in decided], np.array([d[1] for d in decided]),
            np.stack([r.scores[:k] for r in ranked]), np.stack([r.evidence[:k] for r in ranked]), [d[2] for d in decided], regions,
        )  # fmt: skip

    def check_model(self, embed_fn) -> None:  # noqa: ANN001 (sequences -> [n, dim] vectors)
        """Refuse a model that embeds the stored check sequences differently from the one that built the index."""
        check = self.card["check"]
        got = normalise(embed_fn(check["sequences"]))
        if got.shape[1] != self.vectors.shape[1]:
            raise IndexError_(
                f"the index holds {self.vectors.shape[1]}-dim embeddings of {self.card['model']}; this model's are {got.shape[1]}-dim"
            )
        cos = float((got * normalise(np.array(check["vectors"]))).sum(1).min())
        if cos < CHECK_COSINE:
            raise IndexError_(
                f"the index was built with {self.card['model']} (weights {self.card['fingerprint'][:12]}); this model embeds its "
                f"reference sequences differently (cosine {cos:.3f} < {CHECK_COSINE}): rebuild it with `distill index MODEL ...`"
            )

    def save(self, directory: Path) -> Path:
        """Written whole into a temporary directory, then swapped in: a kill never leaves a half-appended index."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp, old = directory.with_name(f".{directory.name}.tmp"), directory.with_name(f".{directory.name}.old")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        np.save(tmp / "vectors.npy", self.vectors)
        rows = zip(self.ids, self.labels, self.sequences, strict=True)
        (tmp / "entries.tsv").write_text("".join(f"{i}\t{label}\t{seq}\n" for i, label, seq in rows))
        (tmp / "index.json").write_text(json.dumps({"format": FORMAT, **self.card, "count": len(self)}, indent=1))
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
        return directory


def load_index(directory: Path) -> ReferenceIndex:
    directory = Path(directory)
    card_path = directory / "index.json"
    if not card_path.is_file():
        raise IndexError_(
            f"{directory} is not a reference index (no index.json); build one with `distill index MODEL --data ... -o {directory}`"
        )
    card = read_json_object(card_path, "index card")
    if card.get("format") != FORMAT:
        raise IndexError_(f"{card_path} is not an esm-distill index card (format {card.get('format')!r})")
    if card.get("align") and card.get("calibration", {}).get("score") != CALL_SCORE:
        raise IndexError_(
            f"{directory} was calibrated by an earlier version (pairwise E-values); calls now vote by E-values over the whole index: "
            f"rebuild it with `distill index MODEL --data ... --align {card['align']} -o {directory}`"
        )
    try:
        vectors = np.load(directory / "vectors.npy")
        rows = [line.split("\t") for line in (directory / "entries.tsv").read_text().splitlines()]
    except (OSError, ValueError) as e:
        raise IndexError_(f"{directory} is corrupt: {e}") from e
    if vectors.ndim != 2 or len(rows) != len(vectors) or len(vectors) != card.get("count") or any(len(r) != 3 for r in rows):
        raise IndexError_(f"{directory} is corrupt: {len(vectors)} vectors, {len(rows)} entries, card says {card.get('count')}")
    return ReferenceIndex(vectors, *([r[c] for r in rows] for c in range(3)), card)
