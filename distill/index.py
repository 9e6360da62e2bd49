"""Annotation transfer from a reference index: labelled embeddings, nearest neighbours by cosine similarity.

bio_embeddings' way: embed labelled reference proteins once, then call a query by its nearest reference. A class
becomes callable by adding its sequences (``--append``), without retraining. Search is exact inner product over
L2-normalised vectors (faiss ``IndexFlatIP``): at 10^5-10^6 references a query costs milliseconds on a CPU.

INDEX/
  index.json      card: model spec, weights fingerprint, pooling, dim, count, calibration, check vectors
  vectors.npy     [n, dim] float32, L2-normalised
  entries.tsv     id<TAB>label<TAB>sequence, one line per vector, same order

``--align N`` (distill.align): calls come from Smith-Waterman re-ranking of the N nearest references by cosine;
the calibrated threshold is then on the alignment score.

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

from distill.calibration import shuffled, threshold_for_precision
from distill.config import DEFAULT_TARGET_PRECISION
from distill.io import read_json_object
from distill.kmers import KmerIndex

FORMAT = "esm-distill-index"
N_CHECK = 8  # reference sequences kept to recognise the model
CHECK_COSINE = 0.99
MAX_NEGATIVES = 2000  # shuffled references embedded to calibrate the similarity threshold
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
    scores: np.ndarray | None = None  # [n, k] alignment scores when the index re-ranks by alignment (the order then)

    @property
    def call_scores(self) -> np.ndarray:
        """What the calibrated threshold applies to: alignment scores when re-ranked, else cosine similarities."""
        return self.scores if self.scores is not None else self.similarities


class ReferenceIndex:
    def __init__(self, vectors: np.ndarray, ids: list[str], labels: list[str], sequences: list[str], card: dict[str, Any]):
        try:
            import faiss
        except ImportError as e:  # optional: esm-distill[index]
            raise ImportError("reference indexes need faiss: pip install 'esm-distill[index]'") from e
        self.vectors, self.ids, self.labels, self.sequences, self.card = normalise(vectors), list(ids), list(labels), list(sequences), card
        self._faiss = faiss.IndexFlatIP(self.vectors.shape[1])
        self._faiss.add(self.vectors)
        self._aligner = None
        self._kmers: KmerIndex | None = None

    @property
    def align(self) -> int:
        """Candidates re-ranked by alignment per query (0: calls by cosine similarity alone)."""
        return int(self.card.get("align", 0))

    @property
    def threshold(self) -> float:
        return float(self.card.get("calibration", {}).get("threshold", 0.0))

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int, sequences: list[str] | None = None, exclude_self: bool = False) -> Neighbours:
        """The k nearest references; with an ``--align`` index and the query ``sequences``, re-ranked by alignment.

        ``exclude_self`` (calibration only): queries are the references themselves, in order; each skips itself.
        """
        k = min(k, len(self) - exclude_self)
        q = normalise(queries)
        depth = max(k, self.align if sequences is not None else 0) + exclude_self
        sims, idx = self._faiss.search(q, min(depth, len(self)))
        if exclude_self:
            keep = idx != np.arange(len(idx))[:, None]
            keep[keep.all(1), -1] = False  # self not among them (duplicate vectors): drop the last instead
            idx, sims = idx[keep].reshape(len(idx), -1), sims[keep].reshape(len(idx), -1)
        scores = None
        if sequences is not None and self.align:
            from distill.align import Aligner, rerank  # pyopal (optional extra): only when re-ranking

            self._aligner = self._aligner or Aligner(self.sequences)
            candidates = list(idx)
            if self.card.get("kmer"):  # and the nearest by shared k-mers (distill.kmers): both prefilters' candidates
                self._kmers = self._kmers or KmerIndex(self.sequences, int(self.card["kmer"]))
                near = self._kmers.search(sequences, self.align, np.arange(len(idx)) if exclude_self else None)
                candidates = [np.concatenate([c, w[~np.isin(w, c)]]) for c, w in zip(candidates, near, strict=True)]
            idx, scores = rerank(self._aligner, sequences, candidates, k)
            sims = (q[:, None, :] * self.vectors[idx]).sum(-1)
        idx, sims = idx[:, :k], sims[:, :k]
        return Neighbours([[self.ids[j] for j in row] for row in idx], [[self.labels[j] for j in row] for row in idx], sims, scores)

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
    try:
        vectors = np.load(directory / "vectors.npy")
        rows = [line.split("\t") for line in (directory / "entries.tsv").read_text().splitlines()]
    except (OSError, ValueError) as e:
        raise IndexError_(f"{directory} is corrupt: {e}") from e
    if vectors.ndim != 2 or len(rows) != len(vectors) or len(vectors) != card.get("count") or any(len(r) != 3 for r in rows):
        raise IndexError_(f"{directory} is corrupt: {len(vectors)} vectors, {len(rows)} entries, card says {card.get('count')}")
    return ReferenceIndex(vectors, *([r[c] for r in rows] for c in range(3)), card)


def calibrate_calls(index: ReferenceIndex, negatives: list[str], negative_vectors: np.ndarray, target: float) -> dict[str, Any]:
    """Leave-one-out calls over the references (right if the nearest other reference shares the label) + negatives.

    A reference whose label occurs once cannot be called right; it counts all the same, so coverage is what a query
    of a stored class would see. Scores are cosine similarities, or alignment scores for an ``--align`` index.
    """
    nn = index.search(index.vectors, 1, index.sequences, exclude_self=True)
    correct = np.array([labels[0] == label for labels, label in zip(nn.labels, index.labels, strict=True)])
    neg = index.search(negative_vectors, 1, negatives).call_scores[:, 0] if len(negatives) else np.zeros(0, np.float32)
    th = threshold_for_precision(np.r_[nn.call_scores[:, 0], neg], np.r_[correct, np.zeros(len(neg), bool)], target, len(index))
    return {"threshold": th.threshold, "score": "alignment" if index.align else "cosine", "target_precision": target,
            "precision": th.precision, "coverage": th.coverage, "reached": th.reached,
            "leave_one_out_accuracy": float(correct.mean()), "n_negatives": int(len(neg))}  # fmt: skip


def build_index(
    embed_fn, ids: list[str], sequences: list[str], labels: list[str], card: dict[str, Any],  # noqa: ANN001
    previous: ReferenceIndex | None = None, target: float = DEFAULT_TARGET_PRECISION, seed: int = 0,
    vectors: np.ndarray | None = None,
) -> ReferenceIndex:  # fmt: skip
    """Embed ``sequences`` (appended to ``previous`` when given; ``vectors`` when already embedded), then calibrate
    the call threshold."""
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
    index.card["calibration"] = calibrate_calls(index, negatives, embed_fn(negatives), target)
    index.card["labels"] = len(set(labels))
    return index
