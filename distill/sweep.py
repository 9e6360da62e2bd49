"""`distill sweep CONFIG.toml`: the study's experiment in one command.

presets x temperatures x lambdas (lambda = 0 is the vanilla MLM baseline, trained once per preset) -> one
shared teacher cache -> every student trained (finished runs are skipped, interrupted ones resumed) -> every
student, the teacher and the baselines probed on each task under one protocol -> REPORT/report.md with the
study-style tables and the figures.

    out = "sweep"                                  # report directory
    data = "train.fasta"                           # MLM / distillation training set
    valid = "valid.fasta"                          # optional; also the perplexity column
    teacher = "esm1b_t33_650M_UR50S"               # fair-esm name or .pt
    presets = ["small", "medium"]
    temperatures = [1.0, 2.0]
    lambdas = [0.0, 0.5]
    epochs = 3                                     # optional, else the preset's
    teacher_cache = true                           # one cache (K = epochs views) shared by all runs
    baselines = true                               # random init + amino-acid composition rows
    [fit]                                          # any other `distill fit` setting
    max_tokens = 8192
    [tasks.pfam]                                   # one table per task: its data and probe settings
    data = ["pfam_families/"]
    [tasks.scope]
    data = ["astral.fa"]
    split = "family-holdout"
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

from distill import data, teacher_cache
from distill.config import PRESETS, FitConfig, ProbeConfig, SweepConfig
from distill.distributed import pick_device
from distill.errors import UserError
from distill.io import atomic_write_text, read_json_object
from distill.report import evaluate_models
from distill.teacher_cache import load_teacher
from distill.train import fit


def grid(cfg: SweepConfig) -> list[tuple[str, str, float, float]]:
    """(run name, preset, T, lambda); lambda = 0 once per preset (the temperature does not matter there)."""
    runs = []
    lambdas = cfg.lambdas
    several = len([x for x in lambdas if x > 0]) > 1
    for preset in cfg.presets:
        p = PRESETS[preset]
        base = f"Student-h{p['dim']}-L{p['layers']}"
        if 0 in lambdas:
            runs.append((f"{base}-vanilla", preset, 1.0, 0.0))
        for t in cfg.temperatures:
            for lam in (x for x in lambdas if x > 0):
                runs.append((f"{base}-T{float(t):.1f}" + (f"-lam{lam:g}" if several else ""), preset, float(t), float(lam)))
    return runs


def _finished(run: Path) -> bool:
    ckpt = run / "checkpoint.json"
    if not ckpt.is_file() or not (run / "student" / "config.json").is_file():
        return False
    state, config = read_json_object(ckpt), read_json_object(run / "config.json")
    return state.get("epoch", 0) >= (config.get("epochs") or 0)


def build_cache(cfg: SweepConfig, out: Path, views: int, console: Console) -> Path:
    cache = out / "teacher-cache"
    seqs = data.load_fasta(Path(cfg.data))
    key = dict(n_records=len(seqs), mask_rate=cfg.fit_config().mask_rate, seed=cfg.seed, views=views)
    dev = pick_device(cfg.fit_config().device)
    net, sha = load_teacher(cfg.teacher, dev)
    full = teacher_cache.CacheKey(teacher=cfg.teacher, teacher_sha256=sha, data_sha256=data.dataset_fingerprint(Path(cfg.data)), **key)
    stats = teacher_cache.build(seqs, net, full, cache, cfg.fit_config().max_tokens, dev, quiet=True)
    console.print(f"teacher cache {cache}: {views} views, {stats['bytes'] / 1e6:.1f} MB")
    return cache


def run_sweep(config: Path, console: Console) -> Path:
    cfg = SweepConfig.from_toml(config)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    runs = grid(cfg)
    console.print(f"sweep: {len(runs)} students ({', '.join(r[0] for r in runs)}) + teacher, tasks {', '.join(cfg.tasks)}")
    cache = None
    if cfg.teacher_cache and any(lam > 0 for *_, lam in runs):
        t0 = time.perf_counter()
        cache = build_cache(cfg, out, cfg.epochs or 1, console)
        timings["teacher cache"] = time.perf_counter() - t0
    students = []
    for name, preset, t, lam in runs:
        run = out / "runs" / name
        students.append(str(run / "student"))
        if _finished(run):
            console.print(f"{name}: finished earlier, skipped")
            continue
        fit_cfg = FitConfig(
            **{**cfg.fit, "data": cfg.data, "valid": cfg.valid, "out": str(run), "preset": preset,
               "teacher": cfg.teacher, "temperature": t, "lam": lam, "epochs": cfg.epochs, "seed": cfg.seed,
               "teacher_cache": str(cache) if cache and lam > 0 else None}
        )  # fmt: skip
        t0 = time.perf_counter()
        console.print(f"{name}: training")
        result = fit(fit_cfg, resume=(run / "checkpoint.json").exists())
        timings[name] = time.perf_counter() - t0
        if not result.completed:
            raise UserError(f"{name} was interrupted; rerun `distill sweep {config}` to continue")
    tables = {}
    for task, settings in cfg.tasks.items():
        t0 = time.perf_counter()
        probe_cfg = ProbeConfig(task=task, **{"seed": cfg.seed, **settings, "data": list(settings["data"])})
        specs = [cfg.teacher, *students]
        ppl = Path(cfg.valid) if cfg.valid else None
        tables[task] = evaluate_models(specs, probe_cfg, out / task, console, ppl, cfg.baselines)
        timings[f"probe {task}"] = time.perf_counter() - t0
    atomic_write_text(out / "report.md", report(cfg, tables, timings, out))
    return out / "report.md"


def study_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| Model | Params | Accuracy | Precision | Recall | F1 |", "|---|---|---|---|---|---|"]
    for r in rows:
        p = f"{r['parameters'] / 1e6:.2f}M" if r["parameters"] else "0"
        lines.append(
            f"| {r['model']} | {p} | {r['accuracy']:.3f} | {r['precision_macro']:.3f} | {r['recall_macro']:.3f} | {r['f1_macro']:.3f} |"
        )
    return "\n".join(lines)


def report(cfg: SweepConfig, tables: dict[str, list[dict[str, Any]]], timings: dict[str, float], out: Path) -> str:
    parts = [
        "# Distillation sweep",
        "",
        f"Teacher `{cfg.teacher}`; students {', '.join(cfg.presets)} x T {cfg.temperatures} x lambda "
        f"{cfg.lambdas} (lambda 0 = vanilla MLM); trained on `{cfg.data}`"
        + (f", perplexity on `{cfg.valid}`" if cfg.valid else "")
        + (f", {cfg.epochs} epochs" if cfg.epochs else "")
        + ".",
        "",
    ]
    for task, rows in tables.items():
        protocol = (out / task / "results.md").read_text().split("\n\n")[0]
        parts += [
            f"## {task}",
            "",
            protocol,
            "Precision, recall and F1 below are macro-averaged; the full table (weighted too, perplexity) is in "
            f"[{task}/results.md]({task}/results.md).",
            "",
            study_table(rows),
            "",
            f"![t-SNE]({task}/tsne.png)",
            "",
            f"![confusion]({task}/confusion.png)",
            "",
        ]
    if (out / next(iter(tables)) / "perplexity.png").is_file():
        parts += ["## Perplexity vs size", "", f"![perplexity]({next(iter(tables))}/perplexity.png)", ""]
    parts += ["## Time (this invocation)", "", "| Step | Seconds |", "|---|---|"]
    parts += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    return "\n".join(parts) + "\n"
