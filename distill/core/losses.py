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

Representation distillation (any teacher, ESM-1b's last layer or UniRep's states) adds ``rep_weight * L_rep``: a
learned linear map from the student's hidden states to the teacher's (``Projected``), compared per residue and/or on
the pooled sequence embedding by cosine distance (1 - cos) or mean squared error, normalised by the step's rows.
With ``centre`` the teacher's states are compared less their running mean: a protein LM's embeddings share one large
direction (UniRep-1900's pooled states lie at cosine 0.71 from their mean), so an uncentred target is mostly met by
learning that constant, and what tells proteins apart is the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distill.core import tokens
from distill.core.model import sequence_embedding


@dataclass
class LossParts:
    total: torch.Tensor
    mlm: torch.Tensor  # sum of cross-entropies / normalizer
    kd: torch.Tensor  # sum of KL divergences / normalizer (before the T^2 factor)
    rep: torch.Tensor | None = None  # representation term (before rep_weight); set by the recipe when it is on

    def __post_init__(self) -> None:
        if self.rep is None:
            self.rep = self.mlm.new_zeros(())


def residue_logits(logits: torch.Tensor) -> torch.Tensor:
    """[..., 33] -> [..., 25]: the columns of the tokens that can be MLM targets."""
    return logits[..., torch.from_numpy(tokens.RESIDUE_IDS).to(logits.device)]


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The one KD term, for every task (residues here, classes in fine-tuning): the sum over rows of
    KL(softmax(z_t / T) || softmax(z_s / T)), both [rows, classes]."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum")


def mix(hard: torch.Tensor | float, kd: torch.Tensor | float, lam: float, temperature: float) -> torch.Tensor | float:
    """(1 - lam) * hard + lam * T^2 * kd: the study's objective, for tensors and for the logged floats alike."""
    return (1 - lam) * hard + lam * temperature**2 * kd


def kd_kl_sum(student_logits: torch.Tensor, teacher_residue_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``kl_sum`` over the residue tokens of a [rows, 33] student and a [rows, 25] teacher."""
    return kl_sum(residue_logits(student_logits), teacher_residue_logits, temperature)


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
    return LossParts(mix(mlm, kd, lam, temperature), mlm, kd)


REP_LOSSES = ("cosine", "mse")
REP_LEVELS = ("pooled", "residue", "both")


class Projected(nn.Module):
    """The student with a linear map of its hidden states to the teacher's width: trained with it, never saved in
    its bundle (the bundle is the student alone)."""

    def __init__(self, student: nn.Module, teacher_dim: int, level: str = "both", centre: bool = False):
        super().__init__()
        self.student, self.level, self.centre = student, level, centre
        self.proj = nn.Linear(student.cfg.dim, teacher_dim)
        if centre:  # running means of the teacher's pooled and per-residue states (buffers: a resume continues them)
            self.register_buffer("teacher_mean", torch.zeros(2, teacher_dim))
            self.register_buffer("mean_updates", torch.zeros(2))

    def forward(self, toks: torch.Tensor) -> dict[str, torch.Tensor]:
        """The student's outputs, plus only the projections ``level`` compares (every residue's costs a
        [tokens, dim] x [dim, teacher dim] product)."""
        out = self.student(toks)
        if self.level in ("residue", "both"):
            out["projected"] = self.proj(out["representations"])
        if self.level in ("pooled", "both"):
            out["pooled_projected"] = self.proj(sequence_embedding(out["representations"], toks))
        return out

    @torch.no_grad()
    def centred(self, teacher: dict[str, torch.Tensor], residues: torch.Tensor) -> dict[str, torch.Tensor]:
        """``teacher`` with its ``pooled`` / ``representations`` less their running means (a plain mean over the first
        100 updates, then an exponential one with weight 0.01), updated from this batch while training."""
        if not self.centre:
            return teacher
        out = dict(teacher)
        for row, key in enumerate(("pooled", "representations")):
            if key not in teacher:
                continue
            states = teacher[key].float()
            if self.training:
                batch_mean = (states[residues] if key == "representations" else states).mean(0)
                rate = max(1.0 / (float(self.mean_updates[row]) + 1), 0.01)
                self.teacher_mean[row] += rate * (batch_mean - self.teacher_mean[row])
                self.mean_updates[row] += 1
            out[key] = states - self.teacher_mean[row]
        return out


def rep_distance_sum(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Sum over rows of (1 - cosine) or of the mean squared error over the feature dimension; rows [N, dim]."""
    student, teacher = student.float(), teacher.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).sum()
    return (student - teacher).pow(2).mean(-1).sum()


def representation_loss(out: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], residues: torch.Tensor, kind: str,
                        level: str, n_sequences: int, n_residues: int) -> torch.Tensor:  # fmt: skip
    """``out`` from ``Projected``; ``teacher`` with ``representations`` [B, T, D] and ``pooled`` [B, D]; ``residues`` the
    [B, T] mask of real residues. Pooled rows are divided by the step's sequences, residue rows by its residues."""
    loss = torch.zeros((), device=residues.device)
    if level in ("pooled", "both"):
        loss = loss + rep_distance_sum(out["pooled_projected"], teacher["pooled"], kind) / n_sequences
    if level in ("residue", "both"):
        loss = loss + rep_distance_sum(out["projected"][residues], teacher["representations"][residues], kind) / n_residues
    return loss
