"""Embedding throughput per preset, in one run: eager PyTorch (fair-esm) vs our module vs ONNX Runtime.

    python benchmarks/inference_speed.py [--n 300] [--presets small,medium,large] [--max-tokens 8192]

For each preset (random weights: timing only) and each backend, the same real sequences (SCOPe 2.07
domains from the staged data, cropped to 1,022) are embedded in the same length-sorted token-budget
batches, so the comparison is of the runtimes alone:

  eager      fair-esm's ProteinBertModel of the same dims (fair-esm's attention path), fp32
  torch      our ESM module (SDPA), fp32, torch.inference_mode
  ort-fp32   ONNX Runtime, the exported fp32 graph
  ort-opt    ONNX Runtime, the transformer-optimized graph (fusions)
  ort-int8-batched  ONNX Runtime, dynamic int8, run on the padded batches (how it ran before: batch-dependent)
  ort-int8   ONNX Runtime, dynamic int8, one unpadded sequence per run (how the inference layer runs it now)

"batch |d|" is the largest change of a sequence embedding between a sequence run alone and inside its padded
batch, as each backend runs (ONNX Runtime rows only).

Each measurement runs in its own process, so "peak MB" is that process's peak resident memory
(Python + libraries + model + activations). ONNX Runtime uses its default thread pool (all cores);
torch uses its default threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCOPE = REPO.parent / "shared" / "data" / "scope" / "astral-scopedom-40-2.07.shared85.fa"
BACKENDS = ["eager", "torch", "ort-fp32", "ort-opt", "ort-int8-batched", "ort-int8"]


def batches(n: int, max_tokens: int) -> list[np.ndarray]:
    from distill.core import tokens
    from distill.core.fasta import read_fasta

    records = list(read_fasta(SCOPE))
    rng = np.random.default_rng(0)
    seqs = [tokens.encode(records[i].sequence)[: tokens.MAX_RESIDUES] for i in sorted(rng.choice(len(records), n, replace=False))]
    lengths = np.array([len(s) for s in seqs])
    return [tokens.pad_batch([seqs[i] for i in g]) for g in tokens.token_budget_groups(lengths, np.arange(n), max_tokens)]


def worker(backend: str, preset: str, onnx_dir: Path, n: int, max_tokens: int) -> dict:
    """Runs in a child process: one backend, one preset."""
    import torch

    from distill.core import tokens
    from distill.core.config import ModelConfig
    from distill.core.model import ESM

    work = batches(n, max_tokens)
    dep = None  # batch dependence: measured for the ONNX Runtime backends
    torch.manual_seed(0)
    model = ESM(ModelConfig.preset(preset)).eval()
    if backend == "eager":
        import esm

        cfg = model.cfg
        args = argparse.Namespace(arch="roberta_large", layers=cfg.layers, embed_dim=cfg.dim, ffn_embed_dim=cfg.ffn,
                                  attention_heads=cfg.heads, max_positions=1024, token_dropout=True, emb_layer_norm_before=True)  # fmt: skip
        fair = esm.model.esm1.ProteinBertModel(args, esm.Alphabet.from_architecture("ESM-1b")).eval()
        fair.load_state_dict({**model.state_dict(), **{k: v for k, v in fair.state_dict().items() if k.startswith("contact_head")}})

        def run(b):
            with torch.inference_mode():
                fair(torch.from_numpy(b), repr_layers=[cfg.layers])
    elif backend == "torch":

        def run(b):
            with torch.inference_mode():
                model(torch.from_numpy(b))
    else:
        import onnxruntime as ort

        variant = backend.split("-")[1]
        path = onnx_dir / (f"{preset}.onnx" if variant == "fp32" else f"{preset}.{variant}.onnx")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        one = backend == "ort-int8"  # the inference layer runs int8 graphs one sequence at a time

        def run(b):
            if not one:
                return session.run(["sequence_embedding", "residue_embeddings"], {"tokens": b})[0]
            rows = [
                session.run(["sequence_embedding", "residue_embeddings"], {"tokens": b[i : i + 1, : int((b[i] != tokens.PAD).sum())]})[0]
                for i in range(len(b))
            ]
            return np.concatenate(rows)

        big = max(work, key=len)  # a batch of several sequences: alone vs together
        together = run(big)
        dep = max(
            float(np.abs(run(big[i : i + 1, : int((big[i] != tokens.PAD).sum())])[0] - together[i]).max()) for i in range(min(4, len(big)))
        )

    run(work[0])  # warm-up
    t0 = time.perf_counter()
    for b in work:
        run(b)
    seconds = time.perf_counter() - t0
    real = sum(int((b != tokens.PAD).sum()) for b in work)
    # VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec, so a child would report its parent's peak.
    hwm_kb = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    return {"tokens_per_s": real / seconds, "seqs_per_s": n / seconds, "peak_mb": hwm_kb / 1024, "batch_dep": dep}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--presets", default="small,medium,large")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--worker", nargs=3, metavar=("BACKEND", "PRESET", "ONNX_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], Path(args.worker[2]), args.n, args.max_tokens)))
        return
    if not SCOPE.exists():
        raise SystemExit(f"needs the staged data at {SCOPE}")

    import torch

    from distill.core.config import ModelConfig
    from distill.core.model import ESM
    from export.onnx import export

    print(f"machine: {platform.machine()}, 2 cores, torch {torch.__version__}; {args.n} SCOPe domains, --max-tokens {args.max_tokens}\n")
    print("| preset | backend | tokens/s | seqs/s | vs eager | file MB | peak MB | batch \\|d\\| |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        onnx_dir = Path(d)
        for preset in args.presets.split(","):
            torch.manual_seed(0)
            result = export(
                ESM(ModelConfig.preset(preset)), onnx_dir / f"{preset}.onnx", {"source": "random"}, int8=True, optimize=True, strict=False
            )
            failed = {r.variant: "; ".join(r.failures) for r in result.reports if r.failures}
            sizes = {f"ort-{v}": p.stat().st_size / 1e6 for v, p in result.paths.items()}
            sizes["ort-int8-batched"] = sizes.get("ort-int8", 0.0)
            base = None
            for backend in BACKENDS:
                if backend == "ort-opt" and "opt" not in result.paths:
                    print(f"| {preset} | ort-opt | dropped: {result.dropped.get('opt')} | | | | |")
                    continue
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    backend,
                    preset,
                    str(onnx_dir),
                    "--n",
                    str(args.n),
                    "--max-tokens",
                    str(args.max_tokens),
                ]
                r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
                base = base or r["tokens_per_s"]
                size = f"{sizes[backend]:.1f}" if backend in sizes else "-"
                variant = backend[4:].removesuffix("-batched")
                note = f" (random weights: {failed[variant]})" if variant in failed and backend != "ort-int8-batched" else ""
                dep = "-" if r["batch_dep"] is None else f"{r['batch_dep']:.1e}"
                print(
                    f"| {preset} | {backend}{note} | {r['tokens_per_s']:,.0f} | {r['seqs_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x | {size} | {r['peak_mb']:.0f} | {dep} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
