"""Masked-LM perplexity with a fixed masking seed, so numbers compare across runs and models."""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from distill import data
from distill.model import ESM


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
    for group in data.token_budget_groups(lengths, np.arange(len(seqs)), max_tokens):
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
