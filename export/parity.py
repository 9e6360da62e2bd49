"""The export gate: every graph against PyTorch on real sequences, run the way the inference layer runs it.

Thresholds per variant (``THRESHOLDS``) are what `distill export onnx` and `distill import` enforce; a graph that
fails them is not written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from distill.core import data, tokens
from distill.core.fasta import read_fasta
from distill.core.model import ESM
from distill.inference import Inference
from distill.inference.onnx_backend import OnnxBackend
from export.graph import GraphModule, output_names

PARITY_FASTA = Path(__file__).resolve().parent / "parity.fasta"
THRESHOLDS = {  # the checks every export must pass
    "fp32": {"max_abs_logits": 1e-4, "max_abs_sequence_embedding": 1e-4},
    "opt": {"max_abs_logits": 1e-4, "max_abs_sequence_embedding": 1e-4},
    "trt": {"max_abs_logits": 1e-4, "max_abs_sequence_embedding": 1e-4},
    "fp16": {"min_cosine_sequence_embedding": 0.999},
    # int8 is gated on what users consume (embeddings, head calls); its masked-LM top-1 is reported, not gated.
    "int8": {"min_cosine_sequence_embedding": 0.99, "min_head_top1_agreement": 0.9, "max_abs_probabilities": 0.05},
}
# Dynamic int8 computes one activation scale per tensor, over the whole batch (padding included), so the runtime
# runs these graphs one sequence at a time: a sequence's numbers never depend on its batch companions, and on
# a CPU an unpadded sequence per run is also the faster way (docs/benchmarks.md).
ONE_SEQUENCE = {"int8"}
BATCH_BOUND = {"fp16": 1e-2}  # batch independence through the inference layer; 1e-4 (fp32 rounding) otherwise


def parity_sequences() -> list[str]:
    """12 real SCOPe 2.07 domains of 20-880 residues (provenance: examples/SOURCES.md)."""
    return [r.sequence for r in read_fasta(PARITY_FASTA)]


@dataclass
class Parity:
    variant: str
    metrics: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def parity(model: ESM, path: Path, variant: str, sequences: list[str] | None = None, heads: dict | None = None) -> Parity:
    """Compare the graph with PyTorch on real sequences of mixed lengths (masked like evaluation), run the way the
    inference layer runs it (one padded batch, or one sequence per run for ``ONE_SEQUENCE`` variants)."""
    seqs = sequences or parity_sequences()
    examples = [data.masked_example(tokens.encode(s), data.EVAL_SEED, 0, i, 0.15, train=False) for i, s in enumerate(seqs)]
    batch = data.collate(examples, list(range(len(seqs))))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = batch.tokens.numpy().astype(np.int32 if session.get_inputs()[0].type == "tensor(int32)" else np.int64)
    real = batch.tokens.ne(tokens.PAD).numpy()
    logits, residues, pooled, *probs = _run(session, feed, real, heads, one_sequence=variant in ONE_SEQUENCE)
    with torch.no_grad():
        ref = GraphModule(model.float().eval(), heads)(batch.tokens)
    ref_logits, _, ref_pooled, *ref_probs = (t.numpy() for t in ref)
    masked = (batch.labels != data.IGNORE).numpy()
    cos = (pooled * ref_pooled).sum(-1) / (np.linalg.norm(pooled, axis=-1) * np.linalg.norm(ref_pooled, axis=-1))
    m = {
        "max_abs_logits": float(np.abs(logits - ref_logits)[real].max()),
        "max_abs_sequence_embedding": float(np.abs(pooled - ref_pooled).max()),
        "min_cosine_sequence_embedding": float(cos.min()),
        "min_top1_masked": float((logits.argmax(-1) == ref_logits.argmax(-1))[masked].mean()),
    }
    if probs:
        m["max_abs_probabilities"] = max(float(np.abs(a - b).max()) for a, b in zip(probs, ref_probs, strict=True))
        m["min_head_top1_agreement"] = min(float((a.argmax(-1) == b.argmax(-1)).mean()) for a, b in zip(probs, ref_probs, strict=True))
    m["batch_max_abs"] = batch_dependence(path, seqs, list(heads or {}))
    failures = []
    for name, bound in THRESHOLDS[variant].items():
        if name not in m:
            continue  # head checks without heads
        ok = m[name] <= bound if name.startswith("max") else m[name] >= bound
        if not ok:
            failures.append(f"{name} = {m[name]:.3g} (needs {'<=' if name.startswith('max') else '>='} {bound})")
    if probs and variant in ("fp32", "opt", "trt") and m["max_abs_probabilities"] > 1e-4:
        failures.append(f"head probabilities differ by {m['max_abs_probabilities']:.3g} (needs <= 0.0001)")
    bound = BATCH_BOUND.get(variant, 1e-4)
    if m["batch_max_abs"] > bound:
        failures.append(
            f"a sequence's embedding or head probabilities change with its batch by {m['batch_max_abs']:.3g} (needs <= {bound})"
        )
    return Parity(variant, m, failures)


def _run(session: Any, feed: np.ndarray, real: np.ndarray, heads: dict | None, one_sequence: bool) -> list[np.ndarray]:
    """The graph's outputs for a padded batch: in one run, or one unpadded sequence per run (outputs re-padded)."""
    names = output_names(heads)
    if not one_sequence:
        return session.run(names, {"tokens": feed})
    rows = [session.run(names, {"tokens": feed[i : i + 1, : int(real[i].sum())]}) for i in range(len(feed))]
    out = []
    for k in range(len(names)):
        if rows[0][k].ndim == 3:  # [1, length, dim]: pad back to the batch's width
            full = np.zeros((len(feed), feed.shape[1], rows[0][k].shape[-1]), dtype=rows[0][k].dtype)
            for i, r in enumerate(rows):
                full[i, : r[k].shape[1]] = r[k][0]
            out.append(full)
        else:
            out.append(np.concatenate([r[k] for r in rows]))
    return out


def batch_dependence(path: Path, sequences: list[str], tasks: list[str]) -> float:
    """Largest change of an embedding or head probability between a sequence embedded alone and inside a padded
    batch of the other sequences, through the inference layer (how annotate and the service run the graph)."""
    model = Inference(OnnxBackend(path, "cpu"))
    together = model.embed(sequences, tasks=tasks)
    worst = 0.0
    for s, t in zip(sequences[:4], together, strict=False):
        alone = model.embed([s], tasks=tasks)[0]
        worst = max(
            worst,
            float(np.abs(alone.sequence - t.sequence).max()),
            *(float(np.abs(alone.probabilities[k] - t.probabilities[k]).max()) for k in tasks),
        )
    return worst
