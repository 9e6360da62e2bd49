"""Calibrated calls and the no-call: temperature scaling, expected calibration error, a threshold for a precision.

A classifier over a fixed label set must be able to say "none of these". The recipe (Guo et al. 2017 for the
temperature; the threshold as in any score-based annotation tool):

1. fit one temperature ``T`` on validation logits by minimising the negative log-likelihood (the ranking of labels
   does not change, only how sure the head says it is). ``T`` is kept in [0.5, 20]: a head that separates its
   validation set perfectly drives the fit to 0, which says nothing about how much sharper it should be and
   saturates every probability to 1 (no threshold can then separate anything); so sharpening stops at 2x. Negatives are kept out of this fit on purpose: with them
   the in-set calibration got worse (ECE 0.09 -> 0.32 on Pfam, against 0.09 -> 0.011 without);
2. score validation sequences *and negatives*: sequences of classes outside the label set and residue-shuffled
   sequences (same composition and length, no homology), whose every call is wrong;
3. pick the smallest top-1 probability at which the calls made (top-1 >= threshold) reach the target precision on
   that pool. Below it, ``annotate`` writes ``-`` and ``/classify`` answers a no-call. With ``confidence`` c > 0 the
   precision that must reach the target is not the pool's point estimate but its one-sided Clopper-Pearson lower
   bound at level c: on a small pool (a few dozen sequences) a point precision of 1.0 is luck as often as skill,
   and the bound asks for as many right calls as the target needs to be believed (at 0.99 and c = 0.9, 230
   calls without an error, or 388 with one).

The same threshold search serves the reference index, on cosine similarities instead of probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp
from scipy.stats import beta
from sklearn.model_selection import StratifiedKFold

from distill.core.config import DEFAULT_TARGET_PRECISION, PROBE_NEGATIVES

ECE_BINS = 15
T_MIN, T_MAX = 0.5, 20.0  # the temperature's range (see 1. above)


class CalibrationError(ValueError):
    """Calibration data that cannot support a threshold (e.g. no validation examples, no negatives)."""


NEVER = 1.0 + 1e-6  # a probability threshold nothing reaches: a head whose target is out of reach calls nothing
AUTO_FOLDS = 5  # out-of-fold calibration's folds (fine-tuned heads on small sets, every probe head)


def fold_of(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each example's fold (stratified; a class with fewer members than folds sits in fewer folds)."""
    out = np.zeros(len(y), dtype=np.int64)
    min_class = int(np.bincount(y).min())
    split = StratifiedKFold(folds, shuffle=True, random_state=seed) if min_class >= folds else None
    chunks = split.split(np.zeros(len(y)), y) if split else np.array_split(np.random.default_rng([seed, 31]).permutation(len(y)), folds)
    for k, held in enumerate(part[-1] if split else part for part in chunks):
        out[held] = k
    return out


def probe_negatives(n: int, seed: int) -> np.ndarray:
    """Which of ``n`` training sequences (sorted indices, at most ``PROBE_NEGATIVES``, keyed by ``seed``) a probe head
    shuffles into its negatives: `distill probe`, the fine-tune's probe baseline and the benchmarks take the same ones."""
    return np.sort(np.random.default_rng([seed, 13]).permutation(n)[:PROBE_NEGATIVES])


def shuffled(sequences: list[str], seed: int) -> list[str]:
    """Each sequence with its residues permuted (keyed by ``seed`` and position in the list): a negative control."""
    out = []
    for i, s in enumerate(sequences):
        chars = np.array(list(s))
        np.random.default_rng([seed, i, 7]).shuffle(chars)
        out.append("".join(chars))
    return out


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature in [T_MIN, T_MAX] minimising validation NLL (bounded search on log T); 1.0 with nothing to fit."""
    if len(y) == 0:
        return 1.0
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)

    def nll(log_t: float) -> float:
        scaled = z / np.exp(log_t)
        return float(np.mean(logsumexp(scaled, axis=1) - scaled[np.arange(len(y)), y]))

    best = minimize_scalar(nll, bounds=(np.log(T_MIN), np.log(T_MAX)), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(best.x))


def expected_calibration_error(probabilities: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-1 ECE: the support-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    if len(y) == 0:
        return 0.0
    conf = probabilities.max(1)
    correct = probabilities.argmax(1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


@dataclass
class Threshold:
    threshold: float  # calls need a score >= this
    precision: float  # reached on the calibration pool (positives + negatives)
    coverage: float  # fraction of in-set positives called correctly at the threshold
    reached: bool  # False: no threshold reaches the target; the highest score seen is used (almost no calls)
    precision_lower: float = 0.0  # the one-sided lower bound at the confidence asked (the point precision without one)
    calls: int = 0  # calls at the threshold (right ones: coverage x n_positive)


def precision_lower_bound(right: np.ndarray, calls: np.ndarray, confidence: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound on right / calls at ``confidence`` (0: the point estimate)."""
    right, calls = np.asarray(right, dtype=np.float64), np.asarray(calls, dtype=np.float64)
    if confidence <= 0:
        return right / np.maximum(calls, 1)
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(beta.ppf(1 - confidence, right, calls - right + 1))  # right = 0 -> 0


def binomial_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval for k successes in n trials."""
    if n == 0:
        return (0.0, 1.0)
    a = (1 - level) / 2
    return (float(beta.ppf(a, k, n - k + 1)) if k else 0.0, float(beta.ppf(1 - a, k + 1, n - k)) if k < n else 1.0)


def threshold_for_precision(scores: np.ndarray, correct: np.ndarray, target: float, n_positive: int, confidence: float = 0.0) -> Threshold:
    """The lowest score threshold whose calls (score >= t) have precision >= ``target`` (its lower bound at
    ``confidence`` when that is > 0).

    ``scores`` holds the top-1 score of every pooled example and ``correct`` whether its top-1 call is right
    (always False for negatives); coverage is correct calls over the ``n_positive`` in-set examples.
    """
    if not 0 < target <= 1:
        raise CalibrationError(f"the target precision must be in (0, 1], got {target}")
    if len(scores) == 0:
        raise CalibrationError("no calibration examples: a threshold needs validation sequences")
    order = np.argsort(-scores, kind="stable")
    s, c = scores[order], correct[order].astype(np.float64)
    tp, calls = np.cumsum(c), np.arange(1, len(s) + 1)
    precision, lower = tp / calls, precision_lower_bound(tp, calls, confidence)
    # A threshold can only sit at a score value: cut after the last of tied scores.
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    ok = np.flatnonzero(last_of_tie & (lower >= target))
    if len(ok) == 0:
        return Threshold(float(s[0]) + 1e-6, 0.0, 0.0, False, float(lower[last_of_tie].max()))
    k = ok[-1]  # the most calls that still meet the target
    return Threshold(float(s[k]), float(precision[k]), float(tp[k]) / max(n_positive, 1), True, float(lower[k]), int(calls[k]))


def calibrate(
    logits: np.ndarray,
    y: np.ndarray,
    negative_logits: np.ndarray,
    target: float = DEFAULT_TARGET_PRECISION,
    fit: bool = True,
    confidence: float = 0.0,
) -> dict:
    """Temperature + no-call threshold from validation logits (labels ``y``) and negatives' logits.

    Returns the card section stored with a head: ``temperature``, ``threshold``, ``target_precision``, the precision
    and coverage reached, ECE before and after, and the pool's make-up.
    """
    if len(y) == 0:
        raise CalibrationError("no validation examples to calibrate on; give --valid or a larger --valid-fraction")
    if len(negative_logits) == 0:
        raise CalibrationError("no negatives to calibrate the no-call on (shuffled or out-of-set sequences)")
    before = softmax(logits)
    temperature = fit_temperature(logits, y) if fit else 1.0
    after = softmax(logits / temperature)
    neg = softmax(negative_logits / temperature)
    scores = np.r_[after.max(1), neg.max(1)]
    correct = np.r_[after.argmax(1) == y, np.zeros(len(neg), dtype=bool)]
    th = threshold_for_precision(scores, correct, target, len(y), confidence)
    right = round(th.coverage * len(y))
    bounds = {"confidence": confidence, "precision_lower": th.precision_lower, "calls": th.calls,
              "coverage_interval": binomial_interval(right, len(y))} if confidence > 0 else {}  # fmt: skip
    return {
        "temperature": temperature,
        # Unreached: no calls at all. Just above the pool's best score would still let a final head, surer than the
        # pool's fold heads or validation part, call new sequences at a precision no one measured.
        "threshold": th.threshold if th.reached else NEVER,
        "target_precision": target,
        "precision": th.precision,
        "coverage": th.coverage,
        "reached": th.reached,
        **bounds,
        "ece_before": expected_calibration_error(before, y),
        "ece_after": expected_calibration_error(after, y),
        "n_valid": int(len(y)),
        "n_negatives": int(len(neg)),
    }


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (calibration compares probabilities near 1)."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def describe(c: dict) -> str:
    """The one-line summary printed when a calibrated head is written."""
    bound = f" at {c['confidence']:.0%} confidence, lower bound {c['precision_lower']:.4f}" if c.get("confidence") else ""
    low, high = c.get("coverage_interval", (None, None))
    interval = f", 95% interval {low:.3f}-{high:.3f}" if low is not None else ""
    return (f"calibration: temperature {c['temperature']:.3f}, ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}; no-call below "
            f"p = {c['threshold']:.4f} for precision >= {c['target_precision']}{bound} (coverage {c['coverage']:.3f}{interval} of "
            f"{c['n_valid']} {c.get('pool', 'validation')} sequences)")  # fmt: skip


def refusal(c: dict) -> str:
    """Why a head makes no calls, by how much it missed, and what would help."""
    target, confidence = c["target_precision"], c.get("confidence", 0.0)
    message = (
        f"no threshold reaches precision {target} on {c['n_valid']} {c.get('pool', 'validation')} sequences + {c['n_negatives']} negatives"
    )
    if confidence > 0:
        needed = math.ceil(math.log(1 - confidence) / math.log(target)) if target < 1 else math.inf
        message += (f" at {confidence:.0%} confidence (best lower bound {c['precision_lower']:.3f}; the bound needs {needed} calls "
                    f"without an error)")  # fmt: skip
    return (
        message + ", so every call of this head is a no-call; add training sequences, start from a pretrained encoder, "
        "train longer, or lower --target-precision" + (" or --confidence" if confidence > 0 else "")
    )
