"""The service's request and response models (pydantic): what /embed, /classify, /compare, /annotate and /info answer."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Embedded(BaseModel):
    embedding: list[float]
    # [] rather than None when not asked for: bentoml's client cannot decode a null array
    residues: list[list[float]] = Field(default_factory=list, description="[length, dim] per-residue vectors when per_residue is true")
    cropped: bool = Field(False, description="only the leading 1,022 residues were embedded (crop: true)")


class EmbedResponse(BaseModel):
    model: str
    dim: int
    pooling: str
    results: list[Embedded]


class Call(BaseModel):
    label: str
    probability: float


class Neighbour(BaseModel):
    id: str
    label: str
    similarity: float = Field(description="cosine similarity of the embeddings")
    score: float = Field(0.0, description="Smith-Waterman score (BLOSUM62, 11/1) when the index re-ranks by alignment, else 0")


class Classified(BaseModel):
    calls: dict[str, list[Call]] = Field(description="per task, the top-k labels, most probable first")
    no_call: dict[str, bool] = Field(
        default_factory=dict,
        description="per task, true when the top probability is below the head's calibrated threshold: none of these labels",
    )
    cropped: bool = False
    neighbours: list[Neighbour] = Field(default_factory=list, description="nearest labelled references (with a reference index)")
    reference_call: str = Field("", description="the nearest reference's label when its similarity clears the index's threshold, else '-'")


class ClassifyResponse(BaseModel):
    model: str
    results: list[Classified]


class ModelAnswer(BaseModel):
    model: str
    available: bool
    reason: str = ""
    seconds: float = 0.0
    results: list[Classified] = []


class CompareResponse(BaseModel):
    student: ModelAnswer
    reference: ModelAnswer
    top1_agreement: dict[str, float] = Field(default_factory=dict, description="per task, fraction of sequences whose top-1 labels agree")


class AnnotateResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    probabilities: dict[str, list[list[float]]]


class InfoResponse(BaseModel):
    model: str
    tag: str
    backend: str
    provider: str
    preset: str
    parameters: int
    dim: int
    labels: dict[str, list[str]]
    min_probability: dict[str, float] = Field(description="per task, the calibrated no-call threshold (0: none)")
    reference_index: dict[str, Any] = Field(default_factory=dict, description="the reference index, when configured")
    max_length: int
    max_sequences: int
    max_residues: int
    batching: bool
    reference: dict[str, Any]
