"""The sweep's fine-tuned calls: every student of the grid fine-tuned on a labelled task and scored on a held-out file.

A frozen-embedding probe measures what pre-training put into the embedding; a user's calls come from a fine-tuned
model. With ``[finetune.TASK]`` in the sweep config (``data`` and ``test``: labelled files; any other
`distill finetune` setting), each student is fine-tuned with its own training seed (finished runs are skipped,
interrupted ones resumed) and its test accuracy and macro-F1 join the sweep's metrics, so the data-size analysis
(means over seeds, paired distilled - vanilla gains, the log-log slope) covers calls too.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console

from distill.core.config import FinetuneConfig, SweepConfig
from distill.core.errors import UserError
from distill.core.io import atomic_write_json, read_json_object
from distill.core.labels import read_labelled
from distill.recipes.checkpoints import changed_options
from distill.recipes.finetune import RESUME_OVERRIDABLE, finetune
from distill.recipes.probe import classification_metrics
from distill.recipes.sweep.stats import RunKey


def finetune_run(out: Path, task: str, spec: str) -> Path:
    """Where a student (its bundle path) is fine-tuned on ``task``."""
    return out / "finetune" / task / Path(spec).parent.name


def settings_of(task: str, settings: dict[str, Any], student: str, run: Path, seed: int) -> FinetuneConfig:
    rest = {k: v for k, v in settings.items() if k not in ("data", "test")}
    data = [settings["data"]] if isinstance(settings["data"], str) else list(settings["data"])
    return FinetuneConfig(model=student, data=data, task=task, out=str(run), seed=seed, quiet=True, **rest)


def held_out_metrics(bundle: Path, cfg: FinetuneConfig, test: str) -> dict[str, float]:
    """Accuracy and macro-F1 of the fine-tuned head on ``test`` (a test label outside the head's classes is an error
    of the model, as it would be for a user; longer sequences are cropped to the model's window)."""
    from distill.inference import resolve

    ds = read_labelled(test, cfg.rule())
    embedder = resolve(str(bundle))
    probabilities = embedder.run(ds.sequences, [cfg.task], long="crop")[1][cfg.task]
    labels = embedder.labels[cfg.task]
    return classification_metrics(ds.labels, [labels[i] for i in probabilities.argmax(1)])


def scored(run: Path, cfg: FinetuneConfig, test: str) -> dict[str, float]:
    """The held-out metrics, computed once per fine-tuned bundle and test file (a rerun of the sweep reads them)."""
    cache = run / "held_out.json"
    key = {"test": str(test), "bundle_mtime_ns": (run / "model" / "model.safetensors").stat().st_mtime_ns}
    if cache.is_file() and (saved := read_json_object(cache)).get("key") == key:
        return saved["metrics"]
    metrics = held_out_metrics(run / "model", cfg, test)
    atomic_write_json(cache, {"key": key, "metrics": metrics})
    return metrics


def finetune_students(cfg: SweepConfig, students: dict[str, RunKey], out: Path, console: Console) -> dict[str, dict[str, dict[str, Any]]]:
    """task -> student spec -> {"key": RunKey, "accuracy", "f1_macro"}, fine-tuning what is not finished yet."""
    results: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for task, settings in cfg.finetune.items():
        for spec, key in students.items():
            run = finetune_run(out, task, spec)
            ft = settings_of(task, settings, spec, run, key.seed)
            done = (run / "model" / "config.json").is_file()
            if done and (changed := changed_options(run, asdict(ft), RESUME_OVERRIDABLE)):
                raise UserError(f"{run} was fine-tuned with other settings ({', '.join(changed)} differ from [finetune.{task}]);"
                                " delete it to fine-tune again with the new settings, or restore them")  # fmt: skip
            if done:
                console.print(f"{run.name}: fine-tuned on {task} earlier, skipped")
            else:
                console.print(f"{run.name}: fine-tuning on {task}")
                result = finetune(ft, resume=(run / "checkpoint.json").is_file())
                if result.bundle is None:
                    raise UserError(f"fine-tuning {run} was interrupted; rerun the sweep to continue it")
            metrics = scored(run, ft, settings["test"])
            results[task][spec] = {"key": key, "accuracy": metrics["accuracy"], "f1_macro": metrics["f1_macro"]}
    return dict(results)


def values_of(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[RunKey, float]]:
    """The sweep-stats shape: metric -> run -> value."""
    values: dict[str, dict[RunKey, float]] = defaultdict(dict)
    for task, by_student in results.items():
        for r in by_student.values():
            values[f"fine-tuned {task} F1 (macro)"][r["key"]] = r["f1_macro"]
            values[f"fine-tuned {task} accuracy"][r["key"]] = r["accuracy"]
    return dict(values)


def table(results: dict[str, dict[str, dict[str, Any]]], settings: dict[str, dict[str, Any]]) -> str:
    lines = ["## Fine-tuned calls", ""]
    for task, by_student in results.items():
        lines += [f"`distill finetune` on `{settings[task]['data']}`, scored on `{settings[task]['test']}` (held out):", "",
                  "| Model | Accuracy | F1 (macro) |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {Path(spec).parent.name} | {r['accuracy']:.3f} | {r['f1_macro']:.3f} |" for spec, r in by_student.items()]
        lines.append("")
    return "\n".join(lines)
