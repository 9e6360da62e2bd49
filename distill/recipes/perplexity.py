"""Masked-LM perplexity with a fixed masking seed, so numbers compare across runs and models."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distill.core import data, tokens
from distill.core.bundle import load_any
from distill.core.distributed import pick_device
from distill.core.model import ESM


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def perplexity(model: ESM, seqs: data.SequenceSet, max_tokens: int, device: torch.device, mask_rate: float = 0.15) -> tuple[float, int]:
    """exp(mean cross-entropy over masked positions); masks keyed by record id and ``EVAL_SEED``.

    Over-long sequences are evaluated on their leading 1022 residues. Returns (perplexity, targets).
    """
    was_training = model.training
    model.eval()
    lengths = seqs.lengths()
    ce_sum, n = 0.0, 0
    for group in tokens.token_budget_groups(lengths, np.arange(len(seqs)), max_tokens):
        examples = [data.masked_example(seqs.seqs[i], data.EVAL_SEED, 0, data.eval_key(seqs.ids[i]), mask_rate, train=False) for i in group]
        batch = data.collate(examples, group)
        toks, labels = batch.tokens.to(device), batch.labels.to(device)
        with autocast(device):
            logits = model(toks)["logits"]
        sel = labels != data.IGNORE
        ce_sum += F.cross_entropy(logits[sel].float(), labels[sel], reduction="sum").item()
        n += int(sel.sum())
    model.train(was_training)
    return math.exp(ce_sum / n), n


def perplexity_of(model: str, fasta: Path, max_tokens: int, mask_rate: float, device: str) -> dict:
    """`distill perplexity`: any model spec on a FASTA, with the fixed evaluation masking -> a JSON-able row."""
    dev = pick_device(device)
    net, card = load_any(model)
    seqs = data.load_fasta(fasta)
    value, n = perplexity(net.to(dev), seqs, max_tokens, dev, mask_rate)
    return {"model": model, "parameters": card.get("parameters", 0), "fasta": str(fasta), "sequences": len(seqs),
            "masked_positions": n, "perplexity": round(value, 4)}  # fmt: skip
