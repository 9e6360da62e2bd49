"""The training objective: L = (1 - lam) * L_MLM + lam * T^2 * L_KD over the masked positions.

- L_MLM: cross-entropy of the student over the full 33-token vocabulary (as ESM-1b was trained).
- L_KD: KL(softmax(z_t / T) || softmax(z_s / T)). Tokens that can never be a target (<cls>,
  <pad>, <eos>, <unk>, <mask>, '.', '-', <null_1>) are removed from *both* distributions before
  the softmax, so both are distributions over the 25 residue letters; otherwise the student would
  be taught the teacher's arbitrary mass on tokens that never occur at a masked position.

The teacher side is always given as logits over the 25 residue tokens (``tokens.RESIDUE_IDS`` order):
the live teacher is sliced to them, and the teacher-logit cache stores exactly them.

Both terms are returned as *sums* over positions, divided by ``normalizer`` -- the number of
masked positions in the whole optimizer step -- so gradient accumulation over micro-batches and
across processes gives exactly the loss of one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distill.core import tokens


@dataclass
class LossParts:
    total: torch.Tensor
    mlm: torch.Tensor  # sum of cross-entropies / normalizer
    kd: torch.Tensor  # sum of KL divergences / normalizer (before the T^2 factor)


def residue_logits(logits: torch.Tensor) -> torch.Tensor:
    """[..., 33] -> [..., 25]: the columns of the tokens that can be MLM targets."""
    return logits[..., torch.from_numpy(tokens.RESIDUE_IDS).to(logits.device)]


def kd_kl_sum(student_logits: torch.Tensor, teacher_residue_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over rows of KL(softmax(z_t/T) || softmax(z_s/T)) over the residue tokens."""
    log_p_s = F.log_softmax(residue_logits(student_logits).float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_residue_logits.float() / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum")


def distillation_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_residue_logits: torch.Tensor | None,
    lam: float,
    temperature: float,
    normalizer: int,
) -> LossParts:
    """``student_logits`` [N, 33] and ``teacher_residue_logits`` [N, 25] at the N masked positions; ``targets`` [N]."""
    mlm = F.cross_entropy(student_logits.float(), targets, reduction="sum") / normalizer
    if teacher_residue_logits is None or lam == 0:
        kd = mlm.new_zeros(())
    else:
        kd = kd_kl_sum(student_logits, teacher_residue_logits, temperature) / normalizer
    total = (1 - lam) * mlm + lam * temperature**2 * kd
    return LossParts(total, mlm, kd)
