"""Distillation throughput, side by side in one run, on the same real sequences and student:

  1. plain reference loop: fair-esm ProteinBertModel teacher + fair-esm-built student of the same
     dims, batches in file order padded to their longest member, teacher forward every step;
  2. our trainer (`distill fit`) with a live teacher: length-bucketed token-budget batches, SDPA;
  3. our trainer on a teacher-logit cache (K=1), the cache's build time spread over E epochs.

    python benchmarks/train_throughput.py [--n 400] [--preset small] [--batch-size 32] [--profile]

The teacher is an ESM-1b-architecture model this CPU can afford (12 layers x 480 dim x 20 heads,
FFN 1920, ~35M parameters, random weights: timing only). Sequences: a seeded sample of SCOPe 2.07
domains from the staged data (file order kept), cropped to 1,022 residues. Model-FLOP utilisation
(MFU) counts the FLOPs the job needs on real tokens (student forward+backward = 3x forward, teacher
forward, cache build amortised over E) against this machine's measured fp32 matmul peak.
"""

from __future__ import annotations

import argparse
import argparse as _argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import esm
import numpy as np
import torch

from distill.core import data, tokens
from distill.core.config import FitConfig, ModelConfig
from distill.core.fasta import read_fasta
from distill.core.losses import distillation_loss, residue_logits
from distill.core.model import ESM
from distill.core.pretrained import save_fair_esm
from distill.recipes import teacher_cache
from distill.recipes.fit import fit
from distill.recipes.teacher_cache import load_teacher

REPO = Path(__file__).resolve().parents[1]
SCOPE = REPO.parent / "shared" / "data" / "scope" / "astral-scopedom-40-2.07.shared85.fa"
TEACHER = ModelConfig(layers=12, dim=480, heads=20, ffn=1920)


def matmul_peak_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    t0, n = time.perf_counter(), 10
    for _ in range(n):
        a @ b
    return 2 * 2048**3 * n / (time.perf_counter() - t0) / 1e9


def forward_flops(cfg: ModelConfig, tokens_: int, mean_len: float) -> float:
    """Matmul FLOPs of one forward pass over ``tokens_`` real tokens (attention at the mean length)."""
    per_token = 2 * (cfg.layers * (4 * cfg.dim**2 + 2 * cfg.dim * cfg.ffn) + cfg.dim**2 + cfg.dim * cfg.vocab_size)
    per_token += cfg.layers * 4 * mean_len * cfg.dim
    return per_token * tokens_


def sample(n: int, out: Path) -> Path:
    records = list(read_fasta(SCOPE))
    keep = sorted(random.Random(0).sample(range(len(records)), n))  # file order kept
    out.write_text("".join(f">{records[i].id}\n{records[i].sequence}\n" for i in keep))
    return out


def reference_epoch(fasta: Path, teacher_pt: Path, student_cfg: ModelConfig, batch_size: int) -> dict:
    """The plain loop: everything fair-esm, file order, pad to the longest, teacher every step."""
    with torch.serialization.safe_globals([_argparse.Namespace]):
        teacher, alphabet = esm.pretrained.load_model_and_alphabet_local(str(teacher_pt))
    teacher.eval().requires_grad_(False)
    args = _argparse.Namespace(
        arch="roberta_large", layers=student_cfg.layers, embed_dim=student_cfg.dim, ffn_embed_dim=student_cfg.ffn,
        attention_heads=student_cfg.heads, max_positions=1024, token_dropout=True, emb_layer_norm_before=True,
    )  # fmt: skip
    torch.manual_seed(0)
    student = esm.model.esm1.ProteinBertModel(args, alphabet).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.01)
    seqs = data.load_fasta(fasta)
    real = padded = 0
    t0 = time.perf_counter()
    for start in range(0, len(seqs), batch_size):
        idx = list(range(start, min(len(seqs), start + batch_size)))
        examples = [data.masked_example(seqs.seqs[i], 0, 0, i, 0.15, train=True) for i in idx]
        batch = data.collate(examples, idx)
        sel = batch.labels != data.IGNORE
        with torch.no_grad():
            t_logits = residue_logits(teacher(batch.tokens)["logits"][sel])
        s_logits = student(batch.tokens)["logits"][sel]
        loss = distillation_loss(s_logits, batch.labels[sel], t_logits, 0.5, 2.0, batch.n_targets).total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        real += batch.n_real
        padded += batch.tokens.numel()
    return {"seconds": time.perf_counter() - t0, "tokens": real, "padding": 1 - real / padded}


def ours_epoch(fasta: Path, out: Path, preset: str, batch_size: int, max_tokens: int, **kw) -> dict:
    cfg = FitConfig(data=str(fasta), out=str(out), preset=preset, batch_size=batch_size, max_tokens=max_tokens,
                    epochs=1, valid_fraction=0.0, quiet=True, device="cpu", **kw)  # fmt: skip
    fit(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    real, seconds = sum(r["tokens"] for r in rows), sum(r["seconds"] for r in rows)
    padding = float(np.average([r["padding"] for r in rows], weights=[r["tokens"] for r in rows]))
    return {"seconds": seconds, "tokens": real, "padding": padding}


def profile_breakdown(fasta: Path, teacher_pt: Path, student_cfg: ModelConfig, batch_size: int, max_tokens: int) -> dict:
    """Where one epoch of our live-teacher trainer spends its time (same batching as `distill fit`)."""
    seqs = data.load_fasta(fasta)
    teacher, _ = load_teacher(str(teacher_pt), torch.device("cpu"))
    torch.manual_seed(0)
    student = ESM(student_cfg).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    lengths = seqs.lengths()
    spent = {"masking+batching": 0.0, "teacher forward": 0.0, "student forward+backward": 0.0, "optimizer": 0.0}
    for step in data.plan_epoch(lengths, batch_size, 0, 0):
        t = time.perf_counter()
        examples = {int(i): data.masked_example(seqs.seqs[i], 0, 0, int(i), 0.15, True) for i in step}
        groups = tokens.token_budget_groups(lengths, step, max_tokens)
        batches = [data.collate([examples[i] for i in g], g) for g in groups]
        n = sum(b.n_targets for b in batches)
        spent["masking+batching"] += time.perf_counter() - t
        for b in batches:
            sel = b.labels != data.IGNORE
            t = time.perf_counter()
            with torch.no_grad():
                t_logits = residue_logits(teacher(b.tokens)["logits"][sel])
            spent["teacher forward"] += time.perf_counter() - t
            t = time.perf_counter()
            distillation_loss(student(b.tokens)["logits"][sel], b.labels[sel], t_logits, 0.5, 2.0, n).total.backward()
            spent["student forward+backward"] += time.perf_counter() - t
        t = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        spent["optimizer"] += time.perf_counter() - t
    total = sum(spent.values())
    return {k: v / total for k, v in spent.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="number of SCOPe sequences")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--profile", action="store_true", help="also print where our live-teacher epoch spends its time")
    args = ap.parse_args()
    if not SCOPE.exists():
        raise SystemExit(f"needs the staged data at {SCOPE}")

    student_cfg = ModelConfig.preset(args.preset)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        fasta = sample(args.n, tmp / "scope.fasta")
        torch.manual_seed(0)
        teacher_pt, _ = save_fair_esm(ESM(TEACHER).eval(), tmp / "teacher_t12_480.pt")
        peak = matmul_peak_gflops()
        seqs = data.load_fasta(fasta)
        lengths = seqs.lengths() + 2
        mean_len = float(np.average(lengths, weights=lengths))
        n_tokens = int(lengths.sum())
        print(
            f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, fp32 matmul peak {peak:.0f} GFLOP/s"
        )
        print(f"data: {args.n} SCOPe 2.07 domains (file order), {n_tokens:,} tokens, lengths {lengths.min() - 2}-{lengths.max() - 2}")
        print(f"student: {args.preset} ({ESM(student_cfg).num_parameters() / 1e6:.1f}M), teacher: ESM-1b architecture 12x480 "
              f"({ESM(TEACHER).num_parameters() / 1e6:.1f}M, random weights), batch {args.batch_size} sequences, --max-tokens {args.max_tokens}\n")  # fmt: skip

        ref = reference_epoch(fasta, teacher_pt, student_cfg, args.batch_size)
        live = ours_epoch(fasta, tmp / "live", args.preset, args.batch_size, args.max_tokens, teacher=str(teacher_pt))
        t0 = time.perf_counter()
        net, sha = load_teacher(str(teacher_pt), torch.device("cpu"))
        key = teacher_cache.CacheKey(str(teacher_pt), sha, data.dataset_fingerprint(fasta), len(seqs), 0.15, 0, 1)
        teacher_cache.build(seqs, net, key, tmp / "cache", args.max_tokens, torch.device("cpu"), quiet=True)
        build_s = time.perf_counter() - t0
        cached = ours_epoch(fasta, tmp / "cached", args.preset, args.batch_size, args.max_tokens, teacher_cache=str(tmp / "cache"))
        cache_mb = sum(p.stat().st_size for p in (tmp / "cache").glob("*.npy")) / 1e6

        student_flops = 3 * forward_flops(student_cfg, n_tokens, mean_len)
        teacher_flops = forward_flops(TEACHER, n_tokens, mean_len)

        def line(name: str, seconds: float, padding: float, flops: float, base: float | None) -> None:
            ratio = f"{base / seconds:5.2f}x" if base else "  1.00x"
            print(f"| {name} | {n_tokens / seconds:,.0f} | {seconds:.1f} | {ratio} | {padding:.1%} | {flops / seconds / 1e9 / peak:.1%} |")

        print("| configuration | student tokens/s | s / epoch | vs 1 | padding | MFU |")
        print("|---|---|---|---|---|---|")
        line("1. reference loop (fair-esm, file order, live teacher)", ref["seconds"], ref["padding"], student_flops + teacher_flops, None)
        line("2. distill fit, live teacher", live["seconds"], live["padding"], student_flops + teacher_flops, ref["seconds"])
        for epochs in (10, 20, 30):
            per_epoch = cached["seconds"] + build_s / epochs
            line(
                f"3. distill fit, teacher cache, E={epochs}",
                per_epoch,
                cached["padding"],
                student_flops + teacher_flops / epochs,
                ref["seconds"],
            )
        print(f"\ncache: built in {build_s:.1f}s (teacher load + hash + 1 view), {cache_mb:.2f} MB = "
              f"{cache_mb * 1e6 / n_tokens:.1f} bytes per token per view; a cached epoch alone takes {cached['seconds']:.1f}s")  # fmt: skip
        if args.profile:
            print("\nwhere an epoch of (2) goes:")
            for k, v in profile_breakdown(fasta, teacher_pt, student_cfg, args.batch_size, args.max_tokens).items():
                print(f"  {k:26s} {v:6.1%}")


if __name__ == "__main__":
    main()
