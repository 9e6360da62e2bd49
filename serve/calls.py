"""What /classify answers per sequence from the student's rows: the top-k calls and a scanning head's domains."""

from __future__ import annotations

from typing import Any

import numpy as np

from distill.inference import top_k as best
from distill.inference.layer import raised_thresholds
from distill.inference.scan import Scan, segment
from serve.schemas import Call, DomainHit


def threshold_for(card: dict[str, Any], task: str, label: str) -> float:
    """A label's calibrated threshold: its own where a background proteome raised it, else the head's."""
    return float(raised_thresholds(card.get("calibration", {}).get(task, {})).get(label, card["min_probability"].get(task, 0.0)))


def top_calls(probabilities: dict[str, list[float]], labels: dict[str, list[str]], tasks: list[str], top_k: int) -> dict[str, list[Call]]:
    return {t: [Call(label=lab, probability=p) for lab, p in best(np.asarray(probabilities[t]), labels[t], top_k)] for t in tasks}


def head_domains(s: Scan, card: dict[str, Any], task: str) -> list[DomainHit]:
    """A scanning head's domains in one sequence (runs of windows at or above each label's threshold)."""
    return [
        DomainHit(start=d.start, end=d.end, label=d.label, verdict="call", evalue=-1.0, score=d.score, source=task)
        for d in segment(s, card["labels"][task], lambda label: threshold_for(card, task, label))
    ]
