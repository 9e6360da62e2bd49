"""The esm-distill BentoML service: protein embeddings and Pfam / SCOPe calls over HTTP.

One process by default: the public API (``EsmDistillService``) holds the model (serve/student.py), validates
requests (4xx naming the sequence and the problem), turns probabilities into top-k calls and no-calls, and adds
reference-index neighbours. Two more BentoML services (``bentoml.depends``) join only when asked for:

  Engine              --batching: the model as its own service with adaptive batching across requests (for GPUs;
                      on a CPU the extra hop costs more than batching gains)
  Reference           --compare-with: the comparison model (ESM-1b, UniRep, any torch model spec, with probed heads)

Configuration: the start-up arguments ``serve.schemas.ServeArgs`` (``bentoml.use_arguments``), given as
``bentoml serve serve.service:EsmDistillService --arg model=TAG --arg backend=student-onnx ...``; `distill serve`
writes them, ``bentoml build --arg ...`` bakes them into a Bento.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import logging
import os
import time
from typing import Any, Literal

import bentoml
import numpy as np
from bentoml.exceptions import InvalidArgument
from pydantic import StrictBool, StrictInt  # "3", true or 2.0 for top_k, "yes" for crop: a 400, not a guess

from distill.core import tokens
from distill.inference import SequenceError, resolve
from distill.inference.index import load_index
from distill.inference.layer import scan_settings
from distill.inference.scan import Scan, per_sequence, windows
from distill.inference.sequences import Pieces, prepare
from serve import slow_clients
from serve.calls import head_domains, threshold_for, top_calls
from serve.guard import Guard, limit_for
from serve.resilience import ENGINE_STALL_S, ClientErrorsOnOneLine, call
from serve.schemas import (
    API_KEY_ENV,
    B64,
    AnnotateResponse,
    Classified,
    ClassifyResponse,
    CompareResponse,
    DomainHit,
    Embedded,
    EmbedResponse,
    Encoding,
    InfoResponse,
    ModelAnswer,
    Neighbour,
    ServeArgs,
)
from serve.student import Student, rows_of

ARGS = bentoml.use_arguments(ServeArgs)
MODEL_TAG, BACKEND, VARIANT = ARGS.model, ARGS.backend, ARGS.variant
BATCHING, REFERENCE_INDEX = ARGS.batching, ARGS.reference
MAX_SEQUENCES, MAX_RESIDUES = ARGS.max_sequences, ARGS.max_residues
MAX_TOP_K = 20


logging.getLogger("bentoml._internal.server.http_app").addFilter(ClientErrorsOnOneLine())
slow_clients.install(ARGS.client_timeout)  # uvicorn has no request-head deadline of its own (serve/slow_clients.py)
TIMEOUT = 600


# ---- validation (shared by every endpoint) -----------------------------------------------------------


def check_sequences(sequences: list[str], crop: bool) -> Pieces:
    """Validated (and, when asked, cropped) sequences; anything wrong is a 400 naming the sequence index and the problem."""
    if not sequences:
        raise InvalidArgument("sequences is empty: send at least one sequence")
    if len(sequences) > MAX_SEQUENCES:
        raise InvalidArgument(f"{len(sequences)} sequences in one request; the limit is {MAX_SEQUENCES}")
    try:
        prepared = prepare(sequences, "crop" if crop else "error")
    except SequenceError as e:
        raise InvalidArgument(str(e)) from e
    total = sum(len(s) for s in prepared.pieces)
    if total > MAX_RESIDUES:
        raise InvalidArgument(f"{total} residues in one request; the limit is {MAX_RESIDUES}")
    return prepared


def b64(values: Any) -> str:
    """Vectors (a list, nested lists or an array) as little-endian float32 bytes in base64 (schemas.Encoding)."""
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


def check_answer_size(residues: int, dim: int, limit: int) -> None:
    """``per_residue`` answers grow with residues x dim (a JSON float is ~10 bytes): bounded, with a 4xx naming the bound."""
    if residues * dim > limit:
        raise InvalidArgument(
            f"a per_residue answer of {residues:,} residues x {dim} dims exceeds the limit of {limit:,} values; "
            f"send at most {limit // dim:,} residues per request with per_residue"
        )


def check_tasks(tasks: tuple[str, ...], labels: dict[str, list[str]], top_k: int) -> list[str]:
    """The asked-for heads (empty: all of them), checked; and top_k in range."""
    if not labels:
        raise InvalidArgument(
            "no head in this model: classification needs heads (`distill probe BUNDLE --task pfam|scope`, then re-import)"
        )
    tasks = list(tasks) or list(labels)
    unknown = [t for t in tasks if t not in labels]
    if unknown:
        raise InvalidArgument(f"unknown task(s) {unknown}; this model has heads for {', '.join(labels)}")
    if not 1 <= top_k <= min(MAX_TOP_K, *(len(labels[t]) for t in tasks)):
        raise InvalidArgument(f"top_k must be between 1 and {min(MAX_TOP_K, *(len(labels[t]) for t in tasks))}, got {top_k}")
    return tasks


# ---- services ---------------------------------------------------------------------------------------


STORED = bentoml.models.BentoModel(MODEL_TAG) if BACKEND != "esm1b" else None  # declared: a Bento carries it


@bentoml.service(name="esm-distill-engine", workers=1, traffic={"timeout": TIMEOUT})
class Engine:
    """The student as its own service, only with --batching: BentoML then merges concurrent requests into batches
    (worth it on a GPU, where 256 sequences cost little more than one; on a CPU one request fills the cores)."""

    stored = STORED

    def __init__(self) -> None:
        self.student = Student(ARGS, self.stored)

    @bentoml.api(batchable=True, max_batch_size=256, max_latency_ms=60_000)
    def infer(self, sequences: list[str]) -> list[dict[str, Any]]:
        return self.student.infer(sequences)

    @bentoml.api
    def residues(self, sequences: list[str]) -> list[dict[str, Any]]:
        return self.student.residues(sequences)  # unbatched: per-residue answers are large

    @bentoml.api
    def card(self) -> dict[str, Any]:
        return self.student.card()


NO_REFERENCE = "no comparison model configured: start the service with `distill serve MODEL --compare-with esm1b_t33_650M_UR50S` (or a .pt, or unirep1900)"


@bentoml.service(name="esm-distill-reference", workers=1, traffic={"timeout": TIMEOUT})
class Reference:
    """ESM-1b (or any fair-esm model) for /compare; optional: without it, /compare says why it cannot answer."""

    def __init__(self) -> None:
        self.embedder, self.reason = None, NO_REFERENCE
        if ARGS.compare:
            try:
                self.embedder = resolve(ARGS.compare, ARGS.compare_heads or None)
                self.reason = ""
            except Exception as e:  # offline, missing file, bad heads: the service still starts
                self.reason = f"comparison model {ARGS.compare!r} could not be loaded: {e}"

    @bentoml.api
    def infer(self, sequences: list[str]) -> dict[str, Any]:
        if self.embedder is None:
            return {"available": False, "reason": self.reason, "model": ARGS.compare, "labels": {}}
        start = time.perf_counter()
        rows = rows_of(self.embedder.embed(sequences, tasks=list(self.embedder.labels)), list(self.embedder.labels))
        return {
            "available": True,
            "model": self.embedder.name,
            "labels": self.embedder.labels,
            "rows": rows,
            "seconds": time.perf_counter() - start,
        }

    @bentoml.api
    def card(self) -> dict[str, Any]:
        if self.embedder is None:
            return {"available": False, "reason": self.reason}
        return {"available": True, "model": self.embedder.name, "dim": self.embedder.dim, "labels": sorted(self.embedder.labels)}


@bentoml.service(name="esm-distill", traffic={"timeout": TIMEOUT, "concurrency": 128})
class EsmDistillService:
    """One process by default: the API holds the student and runs requests side by side in threads. Separate services
    only where they pay: the engine with --batching, the comparison model when one is configured."""

    if BATCHING:
        engine = bentoml.depends(Engine)
    else:
        stored = STORED
    if ARGS.compare:
        reference = bentoml.depends(Reference)

    def __init__(self) -> None:
        self.student = None if BATCHING else Student(ARGS, self.stored)
        self._card: dict[str, Any] | None = None
        self._index = None
        if REFERENCE_INDEX:
            self._index = load_index(REFERENCE_INDEX)
            self._index_checked = False

    async def index(self):  # noqa: ANN201
        """The reference index, checked once against the served model (another model's index is refused)."""
        if self._index is not None and not self._index_checked:
            rows = await self.run(self._index.card["check"]["sequences"])
            self._index.check_model(lambda _: np.array([r["mean"] for r in rows]))
            self._index_checked = True
        return self._index

    async def classified(self, rows: list[dict[str, Any]], prepared: Pieces, tasks: list[str], top_k: int) -> list[Classified]:
        """Calls with no-call flags (+ reference neighbours), one per prepared sequence."""
        card, index = await self.card(), await self.index()
        scans = await self.scans(card, prepared.pieces, tasks)
        out = []
        for i, (r, long) in enumerate(zip(rows, prepared.long, strict=True)):
            probabilities = r["probabilities"] | {t: s[i].best for t, s in scans.items()}  # a scanning head: best windows
            calls = top_calls(probabilities, card["labels"], tasks, top_k)
            no_call = {t: calls[t][0].probability < threshold_for(card, t, calls[t][0].label) for t in tasks}
            domains = [hit for t, s in scans.items() for hit in head_domains(s[i], card, t)]
            out.append(Classified(calls=calls, no_call=no_call, cropped=long, domains=domains))
        if index is not None:
            vectors = np.array([r["mean"] for r in rows], dtype=np.float32)
            # faiss + alignment: CPU work off the event loop
            nn = await asyncio.to_thread(index.search, vectors, top_k, prepared.pieces, domains=bool(index.align))
            scores = nn.scores if nn.scores is not None else np.zeros_like(nn.similarities)
            evidence = nn.evidence if nn.evidence is not None else np.full_like(nn.similarities, np.nan)
            for i, c in enumerate(out):
                c.neighbours = [
                    Neighbour(id=rid, label=lab, similarity=float(s), score=float(x), evalue=-1.0 if np.isnan(e) else float(np.exp(-e)))
                    for rid, lab, s, x, e in zip(nn.ids[i], nn.labels[i], nn.similarities[i], scores[i], evidence[i], strict=True)
                ]
                verdict = index.verdict(nn.calls[i], float(nn.call_scores[i]))
                c.reference_call = nn.calls[i] if verdict == "call" else "-"
                c.related_to = nn.calls[i] if verdict == "related" else ""
                c.reference_score = float(nn.call_scores[i])
                c.domains = [
                    DomainHit(start=d.start, end=d.end, label=d.label, verdict=v, evalue=d.evalue, score=d.score, ref_id=index.ids[d.ref])
                    for d, v in index.reported(nn.domains[i] if nn.domains is not None else [])
                ] + c.domains
        return out

    async def scans(self, card: dict[str, Any], sequences: list[str], tasks: list[str]) -> dict[str, list[Scan]]:
        """Per scanning head (one calibrated on a background proteome), every sequence's windows through the student."""
        out = {}
        for t in tasks:
            if (how := scan_settings(card.get("calibration", {}).get(t, {}))) is None:
                continue
            cut, pieces = windows(sequences, *how)
            probs = np.array([r["probabilities"][t] for r in await self.run(pieces)])
            out[t] = [Scan(sp, p) for sp, p in zip(cut, per_sequence(cut, probs), strict=True)]
        return out

    async def card(self) -> dict[str, Any]:
        if self._card is None:
            self._card = self.student.card() if self.student else await call(self.engine.to_async.card)
        return self._card

    async def run(self, sequences: list[str], per_residue: bool = False) -> list[dict[str, Any]]:
        """The student's rows for ``sequences``: in a thread of this process (the event loop stays free), or from the
        Engine service (retried on transient connection errors, serve/resilience.py)."""
        if self.student is not None:
            return await asyncio.to_thread(self.student.residues if per_residue else self.student.infer, sequences)
        engine = self.engine.to_async
        return await call(engine.residues if per_residue else engine.infer, sequences, stall_s=ENGINE_STALL_S)

    async def reference_call(self, method: str, *args: Any) -> dict[str, Any]:
        """The comparison service's answer, or why there is none."""
        if not ARGS.compare:
            return {"available": False, "reason": NO_REFERENCE, "model": "", "labels": {}}
        return await call(getattr(self.reference.to_async, method), *args)

    @bentoml.api
    async def embed(
        self, sequences: list[str], pooling: Literal["mean", "cls"] = "mean", per_residue: StrictBool = False, crop: StrictBool = False,
        encoding: Encoding = "json",
    ) -> EmbedResponse:  # fmt: skip
        """One vector per sequence (mean over residues, or the <cls> token), in input order; per-residue matrices when asked;
        ``encoding: float32-base64`` sends the vectors as float32 bytes instead of number lists."""
        prepared = check_sequences(sequences, crop)
        card = await self.card()
        pieces = prepared.pieces
        if per_residue:
            check_answer_size(sum(len(p) for p in pieces), card["dim"], ARGS.max_per_residue_values)
        rows = await self.run(pieces, per_residue)  # one forward pass either way
        if encoding == B64:
            results = [
                Embedded(
                    embedding=[], embedding_b64=b64(row[pooling]), residues_b64=b64(row["residues"]) if per_residue else "", cropped=long
                )
                for row, long in zip(rows, prepared.long, strict=True)
            ]
        else:
            results = [
                Embedded(embedding=row[pooling], residues=row.get("residues", []), cropped=long)
                for row, long in zip(rows, prepared.long, strict=True)
            ]
        return EmbedResponse(model=card["model"], dim=card["dim"], pooling=pooling, results=results)

    @bentoml.api
    async def classify(
        self, sequences: list[str], tasks: tuple[str, ...] = (), top_k: StrictInt = 1, crop: StrictBool = False
    ) -> ClassifyResponse:
        """Per sequence and task, the top-k labels with probabilities, the no-call flag, and reference neighbours when configured."""
        card = await self.card()
        tasks = check_tasks(tasks, card["labels"], top_k)
        prepared = check_sequences(sequences, crop)
        rows = await self.run(prepared.pieces)
        return ClassifyResponse(model=card["model"], results=await self.classified(rows, prepared, tasks, top_k))

    @bentoml.api
    async def annotate(
        self, sequences: list[str], tasks: tuple[str, ...] = (), all_tasks: StrictBool = True, encoding: Encoding = "json"
    ) -> AnnotateResponse:
        """Embeddings and full probability vectors (what `distill annotate --url` consumes); no tasks and all_tasks false:
        embeddings only; ``encoding: float32-base64`` sends the embeddings as one float32 matrix."""
        card = await self.card()
        tasks = check_tasks(tasks, card["labels"], 1) if tasks or (all_tasks and card["labels"]) else []
        rows = await self.run(check_sequences(sequences, crop=False).pieces)
        vectors = [r["mean"] for r in rows]
        return AnnotateResponse(
            model=card["model"],
            embeddings=[] if encoding == B64 else vectors,
            embeddings_b64=b64(vectors) if encoding == B64 else "",
            probabilities={t: [r["probabilities"][t] for r in rows] for t in tasks},
        )

    @bentoml.api
    async def compare(
        self, sequences: list[str], tasks: tuple[str, ...] = (), top_k: StrictInt = 1, crop: StrictBool = False
    ) -> CompareResponse:
        """The same sequences through the student and the comparison model (ESM-1b): calls side by side, agreement, latency."""
        card = await self.card()
        tasks = check_tasks(tasks, card["labels"], top_k)
        seqs = check_sequences(sequences, crop).pieces
        start = time.perf_counter()
        rows = await self.run(seqs)
        student = ModelAnswer(
            model=card["model"],
            available=True,
            seconds=time.perf_counter() - start,
            results=[Classified(calls=top_calls(r["probabilities"], card["labels"], tasks, top_k)) for r in rows],
        )
        ref = await self.reference_call("infer", seqs)
        if not ref["available"]:
            return CompareResponse(student=student, reference=ModelAnswer(model=ref["model"], available=False, reason=ref["reason"]))
        missing = [t for t in tasks if t not in ref["labels"]]
        if missing:
            reason = f"the comparison model has no {', '.join(missing)} head (probe it: distill probe {ref['model']} --task ... --out DIR)"
            return CompareResponse(student=student, reference=ModelAnswer(model=ref["model"], available=False, reason=reason))
        reference = ModelAnswer(
            model=ref["model"],
            available=True,
            seconds=ref["seconds"],
            results=[Classified(calls=top_calls(r["probabilities"], ref["labels"], tasks, top_k)) for r in ref["rows"]],
        )
        agreement = {
            t: float(np.mean([a.calls[t][0].label == b.calls[t][0].label for a, b in zip(student.results, reference.results, strict=True)]))
            for t in tasks
        }
        return CompareResponse(student=student, reference=reference, top1_agreement=agreement)

    @bentoml.api
    async def info(self) -> InfoResponse:
        """The model card: preset, parameters, backend, provider, label sets, limits, comparison model."""
        card = await self.card()
        ref = await self.reference_call("card")
        index = await self.index()
        summary = {k: v for k, v in index.card.items() if k not in ("check",)} | {"path": REFERENCE_INDEX} if index is not None else {}
        return InfoResponse(**card, reference_index=summary, max_length=tokens.MAX_RESIDUES, max_sequences=MAX_SEQUENCES,
                            max_residues=MAX_RESIDUES, batching=BATCHING, reference=ref)  # fmt: skip

    @bentoml.api
    async def health(self) -> dict[str, Any]:
        """Ready when the engine answers (BentoML's /readyz and /livez are served too)."""
        card = await self.card()
        return {"status": "ok", "model": card["model"], "backend": card["backend"], "provider": card["provider"]}


# The front door: API key, body limit before parsing, JSON only, one 4xx shape (serve/guard.py).
ENDPOINT_FIELDS = {  # what each public endpoint takes, from its signature: an unknown field is a 400 naming it
    f"/{name}": set(inspect.signature(getattr(EsmDistillService.inner, name).func).parameters) - {"self"}
    for name in ("embed", "classify", "annotate", "compare", "info", "health")
}
EsmDistillService.add_asgi_middleware(
    Guard,
    max_bytes=ARGS.max_request_bytes or limit_for(MAX_SEQUENCES, MAX_RESIDUES),
    api_key=ARGS.api_key or os.environ.get(API_KEY_ENV, ""),
    fields=ENDPOINT_FIELDS,
    body_timeout=ARGS.client_timeout,
    max_concurrency=ARGS.max_concurrency,
)
