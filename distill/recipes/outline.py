"""The training outline that `fit`, `finetune` and `probe` share, written once: AdamW with BERT's decay groups, linear
warm-up then cosine decay, and the optimizer step (clip, step, schedule, zero). Each recipe's loop reads top to
bottom and calls these; the losses they mix are ``distill.core.losses``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


def adamw(
    params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW over the trainable ``params``, without weight decay on biases and norms (the usual BERT/RoBERTa choice)."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def warmup_cosine(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total))


def optimizer_step(
    params: Iterable[torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None,
    clip_norm: float = math.inf,
) -> float:
    """Clip the accumulated gradients to ``clip_norm`` (``inf``: no clipping), step the optimizer and the schedule
    (``None``: a constant rate), clear the gradients; returns the gradient norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(list(params), clip_norm).item()
    opt.step()
    if sched is not None:
        sched.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm
