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
    teacher_cache = true                           # one cache per data size and seed (K views: epochs, or the longest preset's)
    baselines = true                               # random init + amino-acid composition rows
    data_sizes = [1000, 4000]                      # optional: nested random subsets of data (and all of it)
    seeds = [0, 1, 2]                              # optional: training seeds; the probe split stays fixed

With several data sizes or seeds the report adds means +- sd per cell, the paired gain of distillation with 95%
confidence intervals, its log-log slope against M x D next to the study's claimed -1, and one verdict per claim
(``distill.recipes.sweep.stats``). Subset membership is a keyed hash of each record id, so 1k sits inside 4k, and reordering
the input file changes nothing.
    [fit]                                          # any other `distill fit` setting
    max_tokens = 8192
    [tasks.pfam]                                   # one table per task: its data and probe settings
    data = ["pfam_families/"]
    [tasks.scope]
    data = ["astral.fa"]
    split = "family-holdout"
    [finetune.pfam]                                # optional: every student fine-tuned and scored on a held-out file
    data = "pfam_train.fasta"                      # (distill.recipes.sweep.finetune); any other `distill finetune` setting
    test = "pfam_test.fasta"
    epochs = 3
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from rich.console import Console

from distill.core import data
from distill.core.config import PRESETS, FitConfig, ProbeConfig, SweepConfig
from distill.core.distributed import pick_device
from distill.core.errors import UserError
from distill.core.fasta import read_fasta
from distill.core.io import atomic_write_text
from distill.recipes import teacher_cache
from distill.recipes.evaluate import evaluate_models
from distill.recipes.fit import fit, fit_finished
from distill.recipes.sweep import finetune as sweep_finetune
from distill.recipes.sweep import stats as sweep_stats
from distill.recipes.sweep.stats import RunKey
from distill.recipes.teacher_cache import load_teacher


class Run(NamedTuple):
    name: str
    preset: str
    temperature: float
    lam: float
    size: int | None  # training sequences; None: all of ``data``
    seed: int

    def key(self, every: int) -> RunKey:
        """The analysis key; ``every``: the sequences of the whole training file (the size of ``size=None``)."""
        return RunKey(self.preset, self.size or every, self.temperature, self.lam, self.seed)


def grid(cfg: SweepConfig) -> list[Run]:
    """Every run; lambda = 0 once per preset, size and seed (the temperature does not matter there)."""
    several = len([x for x in cfg.lambdas if x > 0]) > 1
    sizes: list[int | None] = [*cfg.data_sizes, None] if cfg.data_sizes else [None]
    seeds = cfg.seeds or [cfg.seed]
    runs = []
    for size in sizes:
        for seed in seeds:
            tail = (f"-n{size if size else 'all'}" if len(sizes) > 1 else "") + (f"-s{seed}" if len(seeds) > 1 else "")
            for preset in cfg.presets:
                p = PRESETS[preset]
                base = f"Student-h{p['dim']}-L{p['layers']}"
                if 0 in cfg.lambdas:
                    runs.append(Run(f"{base}-vanilla{tail}", preset, 1.0, 0.0, size, seed))
                for t in cfg.temperatures:
                    for lam in (x for x in cfg.lambdas if x > 0):
                        name = f"{base}-T{float(t):.1f}" + (f"-lam{lam:g}" if several else "") + tail
                        runs.append(Run(name, preset, float(t), float(lam), size, seed))
    return runs


def stage(cfg: SweepConfig, presets: list[str] | None, sizes: list[str] | None, config: Path) -> tuple[list[Run], str]:
    """The runs of one stage of the grid (``--preset`` / ``--size``; None: all) and its name ("" for the whole grid).
    Run names are the whole grid's, so a later stage or the whole grid resumes the cells a stage finished."""
    runs = grid(cfg)
    if not presets and not sizes:
        return runs, ""
    unknown = sorted(set(presets or []) - set(cfg.presets))
    if unknown:
        raise UserError(f"--preset {', '.join(unknown)}: not among the presets of {config} ({', '.join(cfg.presets)})")
    known = {str(n): n for n in cfg.data_sizes} | {"all": None}
    bad = sorted(set(sizes or []) - set(known))
    if bad:
        raise UserError(f"--size {', '.join(bad)}: not among the data sizes of {config} ({', '.join(known)})")
    chosen = {known[n] for n in sizes or []}
    picked = [r for r in runs if (not presets or r.preset in presets) and (not sizes or r.size in chosen)]
    name = "-".join([*(p for p in cfg.presets if p in (presets or [])), *(f"n{n}" for n in known if n in (sizes or []))])
    return picked, name


def subset_order(records: list, seed: int) -> list[int]:
    """Record indices in a keyed-hash order of their ids: the first n of it is the size-n subset (nested, and
    independent of the file's order)."""
    key = [hashlib.blake2b(f"{seed}:{r.id}".encode(), digest_size=8).digest() for r in records]
    return sorted(range(len(records)), key=lambda i: key[i])


def write_subsets(cfg: SweepConfig, out: Path) -> dict[int | None, tuple[Path, int]]:
    """size -> (training FASTA, sequences); None is the whole file."""
    records = list(read_fasta(Path(cfg.data)))
    subsets: dict[int | None, tuple[Path, int]] = {None: (Path(cfg.data), len(records))}
    order = subset_order(records, cfg.seed)
    for n in cfg.data_sizes:
        if n >= len(records):
            raise UserError(f"data_sizes {n} is not below the {len(records)} sequences of {cfg.data}")
        path = out / "data" / f"n{n}.fasta"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(f">{records[i].id}\n{records[i].sequence}\n" for i in order[:n]))
        subsets[n] = (path, n)
    return subsets


def cache_views(cfg: SweepConfig) -> int:
    """Maskings in the shared teacher cache: one per epoch, so no epoch replays another's masks. Without ``epochs``
    each preset trains for its own (study) epochs; the largest over the config's presets keeps one cache valid for
    every stage of the grid."""
    base = cfg.fit_config()
    return max(replace(base, preset=p, epochs=cfg.epochs).resolved().epochs for p in cfg.presets)  # as fit resolves them


def build_cache(cfg: SweepConfig, fasta: Path, cache: Path, views: int, seed: int, console: Console) -> Path:
    """The teacher's logits on ``fasta`` under the masks of ``seed`` (masking is keyed by the training seed)."""
    seqs = data.load_fasta(fasta)
    dev = pick_device(cfg.fit_config().device)
    net, sha = load_teacher(cfg.teacher, dev)
    full = teacher_cache.cache_key(cfg.teacher, net, sha, fasta, len(seqs), cfg.fit_config().mask_rate, seed, views)
    stats = teacher_cache.build(seqs, net, full, cache, cfg.fit_config().max_tokens, dev, quiet=True)
    console.print(f"teacher cache {cache}: {views} views, {stats['bytes'] / 1e6:.1f} MB")
    return cache


def run_sweep(config: Path, console: Console, presets: list[str] | None = None, sizes: list[str] | None = None) -> Path:
    """Train, probe and fine-tune the grid of ``config`` (or one stage of it) and write the report: OUT/report.md,
    or OUT/stages/NAME/report.md for a stage."""
    cfg = SweepConfig.from_toml(config)
    out = Path(cfg.out)
    runs, stage_name = stage(cfg, presets, sizes, config)
    where = out / "stages" / stage_name if stage_name else out  # the stage's probes, figures and report
    where.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    console.print(f"sweep: {len(runs)} students ({', '.join(r.name for r in runs)}) + teacher, tasks {', '.join(cfg.tasks)}")
    subsets = write_subsets(cfg, out)
    caches: dict[tuple[int | None, int], Path] = {}  # per data size and seed: masks are keyed by the training seed
    if cfg.teacher_cache:
        t0 = time.perf_counter()
        for size, seed in sorted({(r.size, r.seed) for r in runs if r.lam > 0}, key=lambda k: (k[0] or 0, k[1])):
            name = f"n{size if size else 'all'}-s{seed}"
            caches[(size, seed)] = build_cache(cfg, subsets[size][0], out / "teacher-cache" / name, cache_views(cfg), seed, console)
        timings["teacher cache"] = time.perf_counter() - t0
    students: dict[str, RunKey] = {}
    for r in runs:
        run = out / "runs" / r.name
        students[str(run / "student")] = r.key(subsets[None][1])
        if fit_finished(run):
            console.print(f"{r.name}: finished earlier, skipped")
            continue
        fit_cfg = FitConfig(
            **{**cfg.fit, "data": str(subsets[r.size][0]), "valid": cfg.valid, "out": str(run), "preset": r.preset,
               "teacher": cfg.teacher, "temperature": r.temperature, "lam": r.lam, "epochs": cfg.epochs, "seed": r.seed,
               "teacher_cache": str(caches[(r.size, r.seed)]) if (r.size, r.seed) in caches and r.lam > 0 else None}
        )  # fmt: skip
        t0 = time.perf_counter()
        console.print(f"{r.name}: training")
        result = fit(fit_cfg, resume=(run / "checkpoint.json").exists())
        timings[r.name] = time.perf_counter() - t0
        if not result.completed:
            raise UserError(f"{r.name} was interrupted; rerun `distill sweep {config}` to continue")
    tables = {}
    names = {spec: Path(spec).parent.name for spec in students}  # the run, not just the architecture: seeds and sizes apart
    for task, settings in cfg.tasks.items():
        t0 = time.perf_counter()
        probe_cfg = ProbeConfig(task=task, **{"seed": cfg.seed, **settings, "data": list(settings["data"])})
        ppl = Path(cfg.valid) if cfg.valid else None
        tables[task] = evaluate_models([cfg.teacher, *students], probe_cfg, where / task, console, ppl, cfg.baselines, names=names)
        timings[f"probe {task}"] = time.perf_counter() - t0
    finetuned = {}
    if cfg.finetune:
        t0 = time.perf_counter()
        finetuned = sweep_finetune.finetune_students(cfg, students, out, console)
        timings["fine-tune"] = time.perf_counter() - t0
    extra = sweep_finetune.table(finetuned, cfg.finetune) if finetuned else ""
    if len(cfg.data_sizes) + len(cfg.seeds) > 1:
        parameters = {students[r["spec"]].preset: r["parameters"] for rows in tables.values() for r in rows if r["spec"] in students}
        values = sweep_stats.run_values(tables, students) | sweep_finetune.values_of(finetuned)
        extra += "\n" + sweep_stats.section(values, parameters, where)
    atomic_write_text(where / "report.md", report(cfg, tables, timings, where, extra, stage_name))
    return where / "report.md"


def study_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| Model | Params | Accuracy | Precision | Recall | F1 |", "|---|---|---|---|---|---|"]
    for r in rows:
        p = f"{r['parameters'] / 1e6:.2f}M" if r["parameters"] else "0"
        lines.append(
            f"| {r['model']} | {p} | {r['accuracy']:.3f} | {r['precision_macro']:.3f} | {r['recall_macro']:.3f} | {r['f1_macro']:.3f} |"
        )
    return "\n".join(lines)


def report(
    cfg: SweepConfig, tables: dict[str, list[dict[str, Any]]], timings: dict[str, float], out: Path, extra: str = "", stage: str = ""
) -> str:
    parts = [
        "# Distillation sweep" + (f": stage {stage}" if stage else ""),
        "",
        f"Teacher `{cfg.teacher}`; students {', '.join(cfg.presets)} x T {cfg.temperatures} x lambda "
        f"{cfg.lambdas} (lambda 0 = vanilla MLM); trained on `{cfg.data}`"
        + (f", perplexity on `{cfg.valid}`" if cfg.valid else "")
        + (f", {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}" if cfg.epochs else "")
        + "."
        + (f" This report covers the stage {stage} of that grid (the students listed below)." if stage else ""),
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
    parts += [extra] if extra else []
    parts += ["## Time (this invocation)", "", "| Step | Seconds |", "|---|---|"]
    parts += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    return "\n".join(parts) + "\n"
