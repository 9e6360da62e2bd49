"""GPU check for the training fast path (one short run on a CUDA machine):

  A. full-size ESM-1b (33 layers x 1280, random weights: timing only), bf16 inference tokens/s:
     fair-esm's ProteinBertModel vs our ESM module (SDPA: flash / memory-efficient attention);
  B. student training tokens/s (`distill fit`, bf16 autocast) with that teacher live vs from a cache,
     and the cache's build time;
  C. `distill finetune random:large` on the bundled Pfam sample (bf16 autocast): seconds for one epoch
     (validation and calibration included) and the validation accuracy it reached.

    python benchmarks/gpu_train_throughput.py               # on the GPU machine (~6 minutes on an H200)
    python benchmarks/gpu_train_throughput.py --smoke       # tiny sizes on CPU: checks the script runs

Sequences: examples/train.fasta (real proteins, bundled), cropped to 1,022 residues.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import esm
import torch

from distill.core import data, tokens
from distill.core.config import FitConfig, ModelConfig
from distill.core.fasta import read_fasta
from distill.core.model import weights_sha256
from distill.core.pretrained import from_fair_esm
from distill.recipes import teacher_cache
from distill.recipes.fit import fit

REPO = Path(__file__).resolve().parents[1]
ESM1B = ModelConfig(layers=33, dim=1280, heads=20, ffn=5120)
SMOKE = ModelConfig(layers=2, dim=64, heads=4, ffn=128)


def fair_esm_model(cfg: ModelConfig) -> torch.nn.Module:
    args = argparse.Namespace(
        arch="roberta_large", layers=cfg.layers, embed_dim=cfg.dim, ffn_embed_dim=cfg.ffn, attention_heads=cfg.heads,
        max_positions=1024, token_dropout=True, emb_layer_norm_before=True,
    )  # fmt: skip
    return esm.model.esm1.ProteinBertModel(args, esm.Alphabet.from_architecture("ESM-1b"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def inference_tokens_per_s(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> float:
    model = model.to(device, dtype=dtype).eval()
    model(batches[0].to(device))  # warm-up
    sync(device)
    t0, n = time.perf_counter(), 0
    for b in batches:
        model(b.to(device))
        n += int(b.ne(tokens.PAD).sum())
    sync(device)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny models on CPU")
    ap.add_argument("--preset", default="large")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    teacher_cfg, dtype = (SMOKE, torch.float32) if args.smoke else (ESM1B, torch.bfloat16)
    max_tokens = 2048 if args.smoke else args.max_tokens
    n_seqs = 64 if args.smoke else 1380

    seqs = data.load_fasta(REPO / "examples" / "train.fasta")
    seqs = seqs.subset(list(range(n_seqs)))
    lengths = seqs.lengths()
    groups = tokens.token_budget_groups(lengths, seqs.keys[:n_seqs], max_tokens)
    batches = [torch.from_numpy(tokens.pad_batch([data.crop(seqs.seqs[i], None) for i in g])) for g in groups]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke)"
    print(f"device: {name}, torch {torch.__version__}, teacher {teacher_cfg.layers}x{teacher_cfg.dim} {dtype}")

    torch.manual_seed(0)
    fair = fair_esm_model(teacher_cfg)
    ours = from_fair_esm(fair)
    fair_tps = inference_tokens_per_s(fair, batches, device, dtype)
    ours_tps = inference_tokens_per_s(ours, batches, device, dtype)
    print(f"A. teacher inference: fair-esm {fair_tps:,.0f} tokens/s | ours (SDPA) {ours_tps:,.0f} tokens/s | {ours_tps / fair_tps:.2f}x")

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        fasta = tmp / "train.fasta"
        fasta.write_text("".join(f">{seqs.ids[i]}\n{tokens.decode(seqs.seqs[i])}\n" for i in range(n_seqs)))
        from distill.core.pretrained import save_fair_esm

        teacher_pt, _ = save_fair_esm(ours.float().cpu(), tmp / "teacher.pt")
        common = dict(data=str(fasta), preset="custom" if args.smoke else args.preset, batch_size=8 if args.smoke else 64, epochs=1,
                      max_tokens=max_tokens, max_steps=args.steps, valid_fraction=0.0, quiet=True, device=device.type)  # fmt: skip
        if args.smoke:
            common.update(layers=2, dim=32, heads=4)
        results = {}
        for label, extra in {"live teacher": {"teacher": str(teacher_pt)}, "teacher cache": None}.items():
            if extra is None:
                t0 = time.perf_counter()
                net = from_fair_esm(fair).to(device, dtype=dtype).eval()
                key = teacher_cache.CacheKey(
                    str(teacher_pt), weights_sha256(ours.float()), data.dataset_fingerprint(fasta), n_seqs, 0.15, 0, 1
                )
                teacher_cache.build(data.load_fasta(fasta), net, key, tmp / "cache", max_tokens, device, quiet=True)
                print(f"   cache build (1 view of {n_seqs} sequences): {time.perf_counter() - t0:.1f}s")
                extra = {"teacher_cache": str(tmp / "cache")}
            out = tmp / label.replace(" ", "-")
            fit(FitConfig(out=str(out), **common, **extra))
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
            results[label] = sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows)
        live, cached = results["live teacher"], results["teacher cache"]
        print(
            f"B. student training ({common['preset']}): live teacher {live:,.0f} tokens/s | cache {cached:,.0f} tokens/s | {cached / live:.2f}x"
        )
        pfam = REPO / "examples" / "pfam.fasta"
        if args.smoke:  # the first 120 records (8 families): the smoke run checks the path, not the figure
            pfam = tmp / "pfam.fasta"
            records = itertools.islice(read_fasta(REPO / "examples" / "pfam.fasta"), 120)
            pfam.write_text("".join(f">{r.id} {r.description}\n{r.sequence}\n" for r in records))
        finetune_epoch("random:small" if args.smoke else f"random:{args.preset}", pfam, max_tokens, device, tmp)


def finetune_epoch(model: str, pfam: Path, max_tokens: int, device: torch.device, tmp: Path) -> None:
    from distill.core.config import FinetuneConfig
    from distill.recipes.finetune import finetune

    cfg = FinetuneConfig(model, [str(pfam)], "pfam", str(tmp / "finetune"), epochs=1, lr=1e-3,
                         max_tokens=max_tokens, quiet=True, device=device.type, folds=0)  # fmt: skip  # one epoch's time, not 5 folds'
    t0 = time.perf_counter()
    finetune(cfg)
    seconds = time.perf_counter() - t0
    last = json.loads((tmp / "finetune" / "metrics.jsonl").read_text().splitlines()[-1])
    print(f"C. fine-tune {model} on {pfam.name}: 1 epoch in {seconds:.1f}s (validation and calibration on the validation part included), "
          f"validation accuracy {last['valid_accuracy']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
