"""The figures a person would rather look at than read: t-SNE panels, confusion summaries, perplexity vs size."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402
from sklearn.metrics import confusion_matrix  # noqa: E402


def top_labels(labels: list[str], n: int) -> list[str]:
    return [label for label, _ in Counter(labels).most_common(n)]


def tsne_panels(panels: dict[str, np.ndarray], labels: list[str], path: Path, top: int = 10, max_points: int = 2000, seed: int = 0) -> Path:
    """One t-SNE panel per model, points coloured by the ``top`` most frequent labels (same points in every panel)."""
    keep_labels = top_labels(labels, top)
    idx = np.array([i for i, label in enumerate(labels) if label in keep_labels])
    if len(idx) > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_points, replace=False))
    colours = plt.get_cmap("tab10" if len(keep_labels) <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4), squeeze=False)
    for ax, (name, x) in zip(axes[0], panels.items(), strict=True):
        xy = TSNE(n_components=2, perplexity=min(30.0, (len(idx) - 1) / 3), init="pca", random_state=seed).fit_transform(x[idx])
        for c, label in enumerate(keep_labels):
            sel = np.array([labels[i] == label for i in idx])
            ax.scatter(xy[sel, 0], xy[sel, 1], s=5, color=colours(c % colours.N), label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=2, frameon=False)
    fig.suptitle(f"t-SNE of sequence embeddings, {len(keep_labels)} most frequent labels, {len(idx)} test sequences", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def confusion_panels(results: dict[str, tuple[list[str], list[str]]], path: Path, top: int = 15) -> Path:
    """Row-normalised confusion over the ``top`` most frequent true labels (others pooled as 'other'), per model."""
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4.4), squeeze=False)
    for ax, (name, (truth, pred)) in zip(axes[0], results.items(), strict=True):
        keep = top_labels(truth, top)
        names = keep + ["other"]
        t = [x if x in keep else "other" for x in truth]
        p = [x if x in keep else "other" for x in pred]
        cm = confusion_matrix(t, p, labels=names).astype(float)
        cm /= np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(cm, vmin=0, vmax=1, cmap="Blues")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(names)), names, fontsize=6)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(f"{name}\n(diagonal mean {np.mean(np.diag(cm)[:-1]):.2f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def perplexity_vs_parameters(points: dict[str, tuple[int, float]], path: Path) -> Path:
    """Masked-LM perplexity (lower is better) against parameter count, log-scaled x."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, (params, ppl) in points.items():
        ax.scatter(params, ppl, s=25)
        ax.annotate(name, (params, ppl), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("masked-LM perplexity (held-out)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def gain_vs_size(points: dict[str, tuple[list[float], list[float]]], path: Path) -> Path:
    """Mean gain of distillation against M x D (parameters x training sequences), log-log, one series per metric,
    with a least-squares line per series and the study's claimed slope of -1 for reference. Cells whose mean gain
    is not positive cannot sit on a log axis: they are drawn on the axis floor and counted in the legend."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    floor = min([y for _, ys in points.values() for y in ys if y > 0] or [1e-3]) / 3
    for metric, (x, y) in points.items():
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        pos = y > 0
        (dots,) = ax.plot(x[pos], y[pos], "o", label=f"{metric} ({(~pos).sum()} cells <= 0)")
        ax.plot(x[~pos], np.full((~pos).sum(), floor), "v", color=dots.get_color(), alpha=0.5)
        if pos.sum() >= 3:
            slope, intercept = np.polyfit(np.log(x[pos]), np.log(y[pos]), 1)
            grid = np.geomspace(x[pos].min(), x[pos].max(), 20)
            ax.plot(grid, np.exp(intercept) * grid**slope, "-", color=dots.get_color(), alpha=0.6)
    xs = [v for x, _ in points.values() for v in x]
    if xs:
        grid = np.geomspace(min(xs), max(xs), 20)
        ax.plot(grid, floor * 3 * (grid / grid[0]) ** -1.0, "k--", alpha=0.4, label="slope -1 (the study's claim)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("M x D (parameters x training sequences)")
    ax.set_ylabel("gain of distillation (paired mean)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
