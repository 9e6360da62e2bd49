"""The service's pydantic models: its start-up arguments, and what /embed, /classify, /compare, /annotate and /info answer."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from distill.core.config import SERVE

API_KEY_ENV = "ESM_DISTILL_API_KEY"  # how the key reaches the service's processes


class ServeArgs(BaseModel):
    """What the service is started with: ``bentoml serve serve.service:EsmDistillService --arg model=TAG ...``
    (``distill serve`` writes these; ``bentoml build --arg ...`` bakes them into a Bento)."""

    model: str = Field("esm-distill-student:latest", description="model-store tag written by `distill import`")
    backend: Literal["student-onnx", "student-torch", "esm1b"] = "student-onnx"
    variant: Literal["fp32", "int8"] = "fp32"
    esm1b: str = Field("esm1b_t33_650M_UR50S", description="backend esm1b: a fair-esm name or .pt")
    esm1b_heads: str = Field("", description="backend esm1b: its head directory (`distill probe MODEL --out DIR/<task>`)")
    compare: str = Field("", description="comparison model for /compare: a torch model spec (fair-esm name or .pt, unirep1900, a bundle)")
    compare_heads: str = Field("", description="head directory of the comparison model")
    batching: bool = Field(False, description="the model as its own service with adaptive batching across requests (for GPUs)")
    reference: str = Field("", description="a `distill index` directory: /classify adds nearest labelled references")
    max_sequences: int = Field(SERVE.max_sequences, ge=1, description="sequences per request")
    max_residues: int = Field(SERVE.max_residues, ge=1, description="residues per request")
    max_per_residue_values: int = Field(
        1 << 22, ge=1, description="per_residue answers: at most this many residues x dim values (~80 MB of JSON)"
    )
    max_request_bytes: int = Field(
        SERVE.max_request_bytes, ge=0, description="request body limit in bytes (0: derived from the sequence and residue limits)"
    )
    api_key: str = Field(
        "",
        description=f"when set, every endpoint but health and metrics needs it (Authorization: Bearer KEY); "
        f"`distill serve` passes it in ${API_KEY_ENV} instead, never on a command line",
    )
    client_timeout: float = Field(
        SERVE.client_timeout,
        gt=0,
        description="seconds a client may take to send its request head (then the connection is closed) or its whole body (408)",
    )
    max_concurrency: int = Field(
        SERVE.max_concurrency,
        ge=1,
        description="requests a worker takes on at once; more are answered 503 with Retry-After (bounds its memory)",
    )


# How vectors travel: JSON number lists, or the float32 bytes (little-endian, row-major) in base64: ~4x smaller than
# the decimal text and no number parsing (numpy.frombuffer(base64.b64decode(s), "<f4")).
Encoding = Literal["json", "float32-base64"]
B64 = "float32-base64"


class Embedded(BaseModel):
    embedding: list[float] = Field(description="the sequence vector ([] with encoding float32-base64)")
    # [] rather than None when not asked for: bentoml's client cannot decode a null array
    residues: list[list[float]] = Field(default_factory=list, description="[length, dim] per-residue vectors when per_residue is true")
    cropped: bool = Field(False, description="only the leading 1,022 residues were embedded (crop: true)")
    embedding_b64: str = Field("", description="encoding float32-base64: the vector's dim float32 values")
    residues_b64: str = Field("", description="encoding float32-base64 and per_residue: [length, dim] float32, row-major")


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
    # a sentinel, not null: BentoML writes OpenAPI 3.0, which has no null type
    evalue: float = Field(-1.0, description="the alignment's Karlin-Altschul E-value when the index re-ranks by alignment, else -1")


class DomainHit(BaseModel):
    start: int = Field(description="1-based first residue of the region on the query")
    end: int = Field(description="1-based last residue (inclusive)")
    label: str = Field(description="the region's label: the references' vote, or a scanning head's top label")
    verdict: str = Field(description="call: clears the label's threshold; related: significant, below the label's member threshold")
    evalue: float = Field(description="E-value of the strongest reference hit in the region, over the whole index (a head: -1)")
    score: float = Field(0.0, description="the index's vote (-ln E), or the head's probability in the region's best window")
    ref_id: str = Field("", description="that reference (a head: empty)")
    source: str = Field("reference", description="reference (the index), or the task of a head that scans whole proteins")


class Classified(BaseModel):
    calls: dict[str, list[Call]] = Field(description="per task, the top-k labels, most probable first")
    no_call: dict[str, bool] = Field(
        default_factory=dict,
        description="per task, true when the top probability is below the head's calibrated threshold: none of these labels",
    )
    cropped: bool = False
    neighbours: list[Neighbour] = Field(default_factory=list, description="nearest labelled references (with a reference index)")
    reference_call: str = Field(
        "",
        description="the references' call when its score clears the calibrated threshold (an aligning index: the label's own), "
        "else '-': the nearest reference's label (cosine index), or the neighbours' E-value vote (aligning index)",
    )
    reference_score: float = Field(0.0, description="the call's score: cosine similarity, or the vote's evidence (-ln E)")
    related_to: str = Field(
        "", description="an aligning index's vote when significant but below that label's member threshold: a homologue, not called"
    )
    domains: list[DomainHit] = Field(
        default_factory=list,
        description="each region of the query where an aligning index's references hit significantly, in order, then each "
        "domain a scanning head calls",
    )


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
    embeddings: list[list[float]] = Field(description="[sequences, dim] ([] with encoding float32-base64)")
    probabilities: dict[str, list[list[float]]]
    embeddings_b64: str = Field("", description="encoding float32-base64: [sequences, dim] float32, row-major")


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
    calibration: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per task, the head's calibration: per-label thresholds, scan windows, background"
    )
    reference_index: dict[str, Any] = Field(default_factory=dict, description="the reference index, when configured")
    max_length: int
    max_sequences: int
    max_residues: int
    batching: bool
    reference: dict[str, Any]
