"""The training outline fit, finetune and probe share: decay groups, the schedule, the optimizer step."""

from __future__ import annotations

import math

import pytest
import torch

from distill.recipes.outline import adamw, lr_lambda, optimizer_step, warmup_cosine


def test_adamw_decays_matrices_but_not_biases_or_frozen_weights() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    net[2].weight.requires_grad_(False)
    opt = adamw(net.parameters(), lr=1e-3, weight_decay=0.1)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 3])]
    assert [p.shape for p in plain["params"]] == [torch.Size([4]), torch.Size([4]), torch.Size([4]), torch.Size([2])]


def test_warmup_then_cosine_by_hand() -> None:
    f = lr_lambda(warmup=2, total=6)
    # warm-up (step+1)/2, then 0.5 * (1 + cos(pi * (step-2)/4)), 0 from the end on
    assert [f(s) for s in range(8)] == pytest.approx([0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5,
                                                      0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0, 0.0])  # fmt: skip


def test_optimizer_step_clips_steps_schedules_and_clears() -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=1.0)
    sched = warmup_cosine(opt, warmup=2, total=6)
    (w * torch.tensor([3.0, 4.0])).sum().backward()  # gradient (3, 4): norm 5
    assert optimizer_step([w], opt, sched, clip_norm=1.0) == pytest.approx(5.0)
    # clipped to norm 1 and stepped at the warm-up's first rate, 0.5: w = -0.5 * (0.6, 0.8)
    assert w.detach().tolist() == pytest.approx([-0.3, -0.4])
    assert w.grad is None and opt.param_groups[0]["lr"] == pytest.approx(1.0)  # the schedule moved to step 1


def test_optimizer_step_without_schedule_or_clip_keeps_the_rate() -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=0.1)
    (w * torch.tensor([3.0, 4.0])).sum().backward()
    assert optimizer_step([w], opt, None) == pytest.approx(5.0)
    assert w.detach().tolist() == pytest.approx([-0.3, -0.4]) and opt.param_groups[0]["lr"] == 0.1
