"""`distill annotate` vs fair-esm's `esm-extract` way of embedding, on the same real sequences, in one run.

    python benchmarks/annotate_speed.py [--n 2000] [--esm1b-n 40]

Students (small, large presets; random weights, timing does not depend on training) are exported to ONNX
(fp32 and int8; the faster is reported as "best") and run through `distill.recipes.annotate.annotate` (TSV rows +
HDF5 embeddings, the whole command path). The reference is a full-size ESM-1b architecture (33 layers x 1280,
650M parameters, random weights) driven exactly like fair-esm's `scripts/extract.py`: FastaBatchedDataset,
`get_batch_indices(toks_per_batch=4096, extra_toks_per_seq=1)`, `repr_layers=[33]`, mean over residues,
sequences truncated to 1022. ESM-1b is timed on a subsample (``--esm1b-n``) and reported per sequence, so the
ratio compares sequences/s over the same length distribution (the subsample is drawn to match it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill.core.config import ModelConfig  # noqa: E402
from distill.core.fasta import read_fasta  # noqa: E402
from distill.core.model import build_student  # noqa: E402
from distill.inference import resolve  # noqa: E402
from distill.recipes.annotate import Options, annotate  # noqa: E402
from export.onnx import export  # noqa: E402


def real_sequences(n: int) -> list[tuple[str, str]]:
    scope = REPO.parent / "shared" / "data" / "scope" / "astral-scopedom-40-2.07.shared85.fa"
    rng = np.random.default_rng(0)
    records = [(r.id, r.sequence) for r in read_fasta(scope)]
    return [records[i] for i in sorted(rng.choice(len(records), n, replace=False))]


def esm_extract_seconds(records: list[tuple[str, str]], fasta: Path) -> float:
    """fair-esm's extract.py loop over a full-size ESM-1b (random weights)."""
    import esm
    from esm.model.esm1 import ProteinBertModel

    alphabet = esm.Alphabet.from_architecture("ESM-1b")
    args = Namespace(arch="roberta_large", layers=33, embed_dim=1280, ffn_embed_dim=5120, attention_heads=20,
                     max_positions=1024, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     emb_layer_norm_before=True, final_bias=True, logit_bias=True, token_dropout=True)  # fmt: skip
    model = ProteinBertModel(args, alphabet).eval()
    dataset = esm.FastaBatchedDataset.from_file(str(fasta))
    batches = dataset.get_batch_indices(4096, extra_toks_per_seq=1)
    loader = torch.utils.data.DataLoader(dataset, collate_fn=alphabet.get_batch_converter(1022), batch_sampler=batches)
    start = time.perf_counter()
    with torch.no_grad():
        for _labels, strs, toks in loader:
            out = model(toks, repr_layers=[33], return_contacts=False)
            reps = out["representations"][33]
            for i, s in enumerate(strs):
                reps[i, 1 : min(len(s), 1022) + 1].mean(0).clone()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--esm1b-n", type=int, default=40)
    ap.add_argument("--presets", nargs="+", default=["small", "large"])
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    tmp = Path(tempfile.mkdtemp(prefix="annotate-bench-"))
    records = real_sequences(args.n)
    fasta = tmp / "in.fa"
    fasta.write_text("".join(f">{i}\n{s}\n" for i, s in records))
    residues = sum(len(s) for _, s in records)
    print(
        f"{len(records)} real SCOPe 2.07 domains, {residues:,} residues (median length {int(np.median([len(s) for _, s in records]))}), {os.cpu_count()} CPU threads"
    )
    rows = []
    for preset in args.presets:
        model = build_student(ModelConfig.preset(preset), seed=0)
        graph = tmp / f"{preset}.onnx"
        export(model, graph, {"source": "random", "preset": preset}, int8=True, strict=False)
        for variant, path in (("fp32", graph), ("int8", graph.with_name(f"{preset}.int8.onnx"))):
            out = tmp / f"{preset}-{variant}.tsv"
            summary = annotate(fasta, resolve(path), out, Options(embeddings=tmp / f"{preset}-{variant}.h5", quiet=True))
            rows.append(
                (
                    f"distill annotate, {preset} ({model.num_parameters() / 1e6:.1f}M), ONNX {variant}",
                    summary.records / summary.seconds,
                    summary.residues / summary.seconds,
                )
            )
    rng = np.random.default_rng(1)
    sub = [records[i] for i in sorted(rng.choice(len(records), args.esm1b_n, replace=False))]
    sub_fasta = tmp / "sub.fa"
    sub_fasta.write_text("".join(f">{i}\n{s}\n" for i, s in sub))
    seconds = esm_extract_seconds(sub, sub_fasta)
    sub_res = sum(min(len(s), 1022) for _, s in sub)
    esm_seq_s, esm_res_s = len(sub) / seconds, sub_res / seconds
    rows.append((f"esm-extract loop, ESM-1b architecture (652M), fp32 torch, {len(sub)}-sequence subsample", esm_seq_s, esm_res_s))
    print(f"{'pipeline':78s} {'seq/s':>9s} {'residues/s':>11s} {'vs ESM-1b':>10s}")
    for name, seq_s, res_s in rows:
        print(f"{name:78s} {seq_s:9.1f} {res_s:11,.0f} {res_s / esm_res_s:9.1f}x")
    print("ratio column: residues/s relative to the ESM-1b row (sequences/s differ by the subsample's length mix)")


if __name__ == "__main__":
    main()
