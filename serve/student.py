"""The served model, loaded once from the model store (or a fair-esm checkpoint): rows of embeddings and probabilities."""

from __future__ import annotations

from typing import Any

from bentoml.exceptions import InternalServerError

from distill.inference import resolve
from serve.schemas import ServeArgs
from serve.store import open_stored


class Student:
    """The served model, loaded once: in the API process (the default), or inside the Engine service (--batching)."""

    def __init__(self, args: ServeArgs, stored: Any) -> None:
        self.backend = args.backend
        if args.backend == "esm1b":  # the teacher itself, served like a student (heads probed on its embeddings)
            self.embedder = resolve(args.esm1b, args.esm1b_heads or None)
            self.tag, self.name = args.esm1b, self.embedder.name
            self.meta = {"preset": "fair-esm", "parameters": self.embedder.metadata["parameters"]}
            return
        self.embedder = open_stored(stored.path, args.backend, args.variant)
        self.tag, self.name = str(stored.tag), stored.tag.name
        self.meta = dict(stored.info.metadata)

    def infer(self, sequences: list[str]) -> list[dict[str, Any]]:
        try:
            return rows_of(self.embedder.embed(sequences, tasks=list(self.embedder.labels), cls=True), list(self.embedder.labels))
        except Exception as e:  # a failed batch fails its requests with a 5xx, never the server
            raise InternalServerError(
                f"the {self.backend} backend failed on a batch of {len(sequences)} sequences: {type(e).__name__}: {e}"
            ) from e

    def residues(self, sequences: list[str]) -> list[dict[str, Any]]:
        """Like ``infer`` plus the [length, dim] matrices."""
        embedded = self.embedder.embed(sequences, per_residue=True, tasks=[], cls=True)
        return [row | {"residues": e.residues.tolist()} for row, e in zip(rows_of(embedded, []), embedded, strict=True)]

    def card(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "tag": self.tag,
            "backend": self.backend,
            "provider": self.embedder.provider,
            "preset": self.meta.get("preset") or "",
            "parameters": self.meta.get("parameters") or 0,
            "dim": self.embedder.dim,
            "labels": self.embedder.labels,
            "min_probability": getattr(self.embedder, "thresholds", {}),
            "calibration": getattr(self.embedder, "calibrations", {}),
        }


def rows_of(embeddings: list, tasks: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "mean": e.sequence.tolist(),
            "cls": e.cls.tolist() if e.cls is not None else None,
            "probabilities": {t: e.probabilities[t].tolist() for t in tasks},
        }
        for e in embeddings
    ]
