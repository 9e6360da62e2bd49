"""The data-size / seed analysis of `distill sweep`: per-cell means, paired distilled - vanilla differences with 95%
confidence intervals, and the study's claim Delta_distill(M, D) ~ 1 / (M * D) checked by a log-log slope.

A run is identified by (preset, data size, T, lambda, seed). Pairs share preset, size and seed (the same subset, the
same initialisation and data order), so a difference measures distillation alone; the probe split is the same for all.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from distill.recipes import plots


@dataclass(frozen=True)
class RunKey:
    preset: str
    size: int  # training sequences
    temperature: float
    lam: float
    seed: int


@dataclass
class Interval:
    mean: float
    sd: float
    lo: float
    hi: float
    n: int

    def text(self, digits: int = 3) -> str:
        if self.n < 2:
            return f"{self.mean:+.{digits}f} (n = 1)"
        return f"{self.mean:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"


def t_interval(values: list[float] | np.ndarray, level: float = 0.95) -> Interval:
    """Mean, sd and the two-sided t confidence interval of the mean (n - 1 degrees of freedom)."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return Interval(mean, float("nan"), float("nan"), float("nan"), len(v))
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1)) * sd / np.sqrt(len(v))
    return Interval(mean, sd, mean - half, mean + half, len(v))


def paired_differences(values: dict[RunKey, float], higher_is_better: bool = True) -> dict[RunKey, Interval]:
    """Distilled - vanilla (vanilla - distilled for lower-is-better metrics), paired by preset, size and seed;
    keyed by the distilled configuration with ``seed = -1``."""
    vanilla = {(k.preset, k.size, k.seed): v for k, v in values.items() if k.lam == 0}
    deltas: dict[RunKey, list[float]] = defaultdict(list)
    for k, v in values.items():
        base = vanilla.get((k.preset, k.size, k.seed))
        if k.lam > 0 and base is not None:
            deltas[RunKey(k.preset, k.size, k.temperature, k.lam, -1)].append((v - base) if higher_is_better else (base - v))
    return {k: t_interval(d) for k, d in sorted(deltas.items(), key=lambda kv: (kv[0].preset, kv[0].size, kv[0].temperature, kv[0].lam))}


def log_log_slope(x: list[float], y: list[float]) -> Interval | None:
    """Least-squares slope of log(y) on log(x) with its 95% interval; None with fewer than 3 positive points."""
    points = [(a, b) for a, b in zip(x, y, strict=True) if a > 0 and b > 0]
    if len(points) < 3:
        return None
    lx, ly = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    fit = stats.linregress(lx, ly)
    half = float(stats.t.ppf(0.975, len(points) - 2)) * fit.stderr
    return Interval(float(fit.slope), float(fit.stderr), fit.slope - half, fit.slope + half, len(points))


def verdicts(deltas: dict[RunKey, Interval], parameters: dict[str, int], metric: str) -> list[str]:
    """One line per claim of the study: supported, refuted, or cannot tell (and why)."""
    lines = []
    for (preset, t, lam), cells in _by_config(deltas).items():
        sizes = sorted(cells)
        if len(sizes) < 2:
            lines.append(
                f"- {preset} T={t:g} lambda={lam:g}, {metric}: one data size, so whether the gain shrinks with data cannot be told."
            )
            continue
        small, large = cells[sizes[0]], cells[sizes[-1]]
        if small.n >= 2 and large.n >= 2 and small.lo > large.hi:
            word = "supported: the gain at the smallest data size is above the largest one's interval"
        elif small.n >= 2 and large.n >= 2 and small.hi < large.lo:
            word = "refuted: the gain grows with data"
        else:
            word = "cannot tell: the intervals overlap"
        lines.append(f"- {preset} T={t:g} lambda={lam:g}, {metric}: gain {small.text()} at {sizes[0]:,} vs {large.text()} at "
                     f"{sizes[-1]:,} sequences; shrinks with data size: {word}.")  # fmt: skip
    slope = log_log_slope(*_md_points(deltas, parameters))
    if slope is None:
        lines.append(
            f"- Delta ~ 1/(M*D), {metric}: fewer than 3 cells with a positive mean gain, so the slope cannot be fitted: cannot tell."
        )
    else:
        word = (
            "supported" if slope.lo <= -1 <= slope.hi and slope.hi < 0 else "refuted" if not slope.lo <= -1 <= slope.hi else "cannot tell"
        )
        lines.append(f"- Delta ~ 1/(M*D), {metric}: log-log slope {slope.text()} over {slope.n} cells (the claim: -1): {word}.")
    return lines


def _by_config(deltas: dict[RunKey, Interval]) -> dict[tuple[str, float, float], dict[int, Interval]]:
    out: dict[tuple[str, float, float], dict[int, Interval]] = defaultdict(dict)
    for k, v in deltas.items():
        out[(k.preset, k.temperature, k.lam)][k.size] = v
    return out


def _md_points(deltas: dict[RunKey, Interval], parameters: dict[str, int]) -> tuple[list[float], list[float]]:
    keys = list(deltas)
    return [float(parameters[k.preset]) * k.size for k in keys], [deltas[k].mean for k in keys]


def section(values: dict[str, dict[RunKey, float]], parameters: dict[str, int], out: Path) -> str:
    """The report's data-size section: means +- sd per cell, paired gains with 95% CIs, the figure, the verdicts.

    ``values``: metric name -> run -> value; ``perplexity`` is lower-is-better, every other metric higher.
    """
    lines = ["## Data size and seeds", "", "Mean +- sd over seeds per cell:", "", _means_table(values), "",
             "Paired gain of distillation (distilled - vanilla, same preset, data subset and seed; for perplexity vanilla - "
             "distilled, so positive is better either way), mean and 95% t-interval over seeds:", "", "| metric | preset | sequences | T | lambda | gain |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    figure_points: dict[str, tuple[list[float], list[float]]] = {}
    claims: list[str] = []
    for metric, by_run in values.items():
        deltas = paired_differences(by_run, higher_is_better=metric != "perplexity")
        lines += [f"| {metric} | {k.preset} | {k.size:,} | {k.temperature:g} | {k.lam:g} | {v.text()} |" for k, v in deltas.items()]
        figure_points[metric] = _md_points(deltas, parameters)
        claims += verdicts(deltas, parameters, metric)
    plots.gain_vs_size(figure_points, out / "gain_vs_md.png")
    return "\n".join(lines + ["", "![gain vs M x D](gain_vs_md.png)", "", "What the data say about the study's claims:", "", *claims, ""])


def _means_table(values: dict[str, dict[RunKey, float]]) -> str:
    metrics = list(values)
    cells: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for metric, by_run in values.items():
        for k, v in by_run.items():
            cells[(k.preset, k.size, k.temperature if k.lam else 0.0, k.lam)][metric].append(v)
    rows = ["| preset | sequences | T | lambda | seeds | " + " | ".join(metrics) + " |", "|---|---|---|---|---|" + "---|" * len(metrics)]
    for (preset, size, t, lam), by_metric in sorted(cells.items()):
        n = max(len(v) for v in by_metric.values())
        shown = [
            f"{np.mean(by_metric[m]):.3f} +- {np.std(by_metric[m], ddof=1):.3f}"
            if len(by_metric[m]) > 1
            else f"{np.mean(by_metric[m]):.3f}"
            for m in metrics
        ]
        rows.append(f"| {preset} | {size:,} | {t:g} | {lam:g} | {n} | " + " | ".join(shown) + " |")
    return "\n".join(rows)


def run_values(rows: dict[str, list[dict[str, Any]]], runs: dict[str, RunKey]) -> dict[str, dict[RunKey, float]]:
    """Probe tables (task -> evaluate rows, each with ``spec``) -> metric -> run -> value (perplexity, then per task)."""
    values: dict[str, dict[RunKey, float]] = defaultdict(dict)
    for task, table in rows.items():
        for r in table:
            key = runs.get(r["spec"])
            if key is None:
                continue
            if r.get("perplexity") is not None:
                values["perplexity"][key] = r["perplexity"]
            values[f"{task} F1 (macro)"][key] = r["f1_macro"]
            values[f"{task} accuracy"][key] = r["accuracy"]
    return dict(values)
