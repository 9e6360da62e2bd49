import math

import pytest
import torch
import torch.nn.functional as F

from distill.core import tokens
from distill.core.losses import distillation_loss, kd_kl_sum, residue_logits

R = torch.from_numpy(tokens.RESIDUE_IDS)


def logits_over_residues(values: list[float]) -> torch.Tensor:
    """A [1, 33] row: the given values on the first residue tokens, -inf-ish garbage elsewhere."""
    z = torch.full((1, tokens.VOCAB_SIZE), 7.0)  # large mass on non-residue tokens must be ignored by KD
    z[0, R[: len(values)]] = torch.tensor(values)
    z[0, R[len(values) :]] = -30.0
    return z


def test_kd_matches_hand_computation_over_residue_tokens():
    zs, zt, T = logits_over_residues([1.0, 0.0]), logits_over_residues([0.0, 2.0]), 2.0
    ps = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    pt = [1 / (1 + math.e), math.e / (1 + math.e)]
    hand = sum(t * math.log(t / s) for t, s in zip(pt, ps, strict=True))
    assert kd_kl_sum(zs, residue_logits(zt), T).item() == pytest.approx(hand, rel=1e-4)


def test_total_loss_equals_hand_formula():
    torch.manual_seed(0)
    zs, zt = torch.randn(4, tokens.VOCAB_SIZE), torch.randn(4, tokens.VOCAB_SIZE)
    y = R[torch.tensor([0, 3, 5, 7])]
    lam, T, n = 0.3, 2.0, 4
    parts = distillation_loss(zs, y, zt[:, R], lam, T, n)
    ce = -F.log_softmax(zs, -1)[torch.arange(4), y].mean()
    pt = F.softmax(zt[:, R] / T, -1)
    kl = (pt * (pt.log() - F.log_softmax(zs[:, R] / T, -1))).sum(-1).mean()
    assert parts.mlm.item() == pytest.approx(ce.item(), rel=1e-5)
    assert parts.kd.item() == pytest.approx(kl.item(), rel=1e-5)
    assert parts.total.item() == pytest.approx((1 - lam) * ce.item() + lam * T**2 * kl.item(), rel=1e-5)


def test_kd_is_zero_when_student_equals_teacher():
    z = torch.randn(5, tokens.VOCAB_SIZE)
    parts = distillation_loss(z, R[:5], z[:, R].clone(), 0.5, 2.0, 5)
    assert parts.kd.item() == pytest.approx(0.0, abs=1e-6)
    assert parts.total.item() == pytest.approx(0.5 * parts.mlm.item(), rel=1e-6)


def test_t_squared_scaling():
    torch.manual_seed(1)
    zs, zt, y = torch.randn(3, tokens.VOCAB_SIZE), torch.randn(3, tokens.VOCAB_SIZE), R[:3]
    for T in (0.5, 1.0, 2.0):
        p = distillation_loss(zs, y, zt[:, R], 1.0, T, 3)  # lam = 1: pure KD term
        assert p.total.item() == pytest.approx(T**2 * p.kd.item(), rel=1e-6)


def test_lam_zero_is_plain_mlm_and_ignores_teacher():
    zs, y = torch.randn(3, tokens.VOCAB_SIZE), R[:3]
    p = distillation_loss(zs, y, None, 0.0, 2.0, 3)
    assert p.total.item() == pytest.approx(F.cross_entropy(zs, y).item(), rel=1e-6)


def test_normalizer_makes_micro_batches_sum_to_the_big_batch():
    torch.manual_seed(2)
    zs, zt, y = torch.randn(10, tokens.VOCAB_SIZE), torch.randn(10, tokens.VOCAB_SIZE), R[torch.randint(0, 25, (10,))]
    zt = zt[:, R]
    whole = distillation_loss(zs, y, zt, 0.5, 2.0, 10).total
    parts = distillation_loss(zs[:4], y[:4], zt[:4], 0.5, 2.0, 10).total + distillation_loss(zs[4:], y[4:], zt[4:], 0.5, 2.0, 10).total
    assert parts.item() == pytest.approx(whole.item(), rel=1e-6)
