"""`distill sweep CONFIG --merge`: the whole grid's report from its stages, without training or probing again.

A grid too big for one sitting runs in stages (``--preset`` / ``--size``), each probing its own students under the
grid's one protocol. Probing every student again for the whole grid's report would cost as much as all the stages'
probes together; the rows are already on disk (OUT/stages/NAME/TASK/results.json), so the merge reads them, checks
that every stage probed under the same protocol (the same split and settings), and writes OUT/report.md with the
study tables and the data-size analysis over every cell probed so far; students no stage has probed yet (or
fine-tuned, with ``[finetune.TASK]``) are named at the top of the report, so a partial grid is read as one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.core.config import SweepConfig
from distill.core.errors import UserError
from distill.core.fasta import read_fasta
from distill.core.io import atomic_write_text, read_json_object
from distill.recipes.sweep import stats as sweep_stats
from distill.recipes.sweep.finetune import finetune_run, values_of
from distill.recipes.sweep.grid import grid, study_table
from distill.recipes.sweep.stats import RunKey


def grid_students(cfg: SweepConfig) -> dict[str, RunKey]:
    """Every student of the grid: its bundle path (as the stages name it in their rows) -> its key."""
    every = sum(1 for _ in read_fasta(Path(cfg.data)))
    out = Path(cfg.out)
    return {str(out / "runs" / r.name / "student"): r.key(every) for r in grid(cfg)}


def stage_rows(out: Path, task: str) -> tuple[str, dict[str, dict[str, Any]], list[str]]:
    """The protocol, the probe rows by model spec (the first stage to probe a model wins) and the stages read."""
    protocol, rows, read = None, {}, []
    for results in sorted((out / "stages").glob(f"*/{task}/results.json")):
        saved = read_json_object(results, "stage results")
        if protocol is not None and saved["protocol"] != protocol:
            raise UserError(f"{results} was probed under another protocol than {read[0]}'s stages (split, data or probe "
                            "settings changed between stages); run that stage again, or the whole grid without --merge")  # fmt: skip
        protocol = saved["protocol"]
        read.append(results.parent.parent.name)
        for r in saved["rows"]:
            rows.setdefault(r["spec"], r)
    if protocol is None:
        raise UserError(f"no stage of {out} has probed {task}: run the stages first (distill sweep CONFIG --preset P --size N)")
    return protocol, rows, read


def held_out(cfg: SweepConfig, students: dict[str, RunKey]) -> tuple[dict[str, dict[str, dict[str, Any]]], list[str]]:
    """The stages' fine-tuned calls (their held_out.json), as ``sweep_finetune`` returns them, and the runs lacking them."""
    results: dict[str, dict[str, dict[str, Any]]] = {}
    missing = []
    for task in cfg.finetune:
        for spec, key in students.items():
            path = finetune_run(Path(cfg.out), task, spec) / "held_out.json"
            if not path.is_file():
                missing.append(f"{task}/{Path(spec).parent.name}")
                continue
            metrics = read_json_object(path, "fine-tuned calls")["metrics"]
            results.setdefault(task, {})[spec] = {"key": key, "accuracy": metrics["accuracy"], "f1_macro": metrics["f1_macro"]}
    return results, missing


def merge_stages(config: Path) -> tuple[Path, list[str]]:
    """OUT/report.md over the grid's cells probed so far, from the stages' rows, and the students not among them."""
    cfg = SweepConfig.from_toml(config)
    out = Path(cfg.out)
    students = grid_students(cfg)
    tables, parts, stages, missing = {}, [], set(), []
    for task in cfg.tasks:
        protocol, rows, read = stage_rows(out, task)
        stages.update(read)
        missing += [f"{task}/{Path(s).parent.name}" for s in students if s not in rows]
        tables[task] = [rows[s] for s in [cfg.teacher, *students] if s in rows]
        parts += [f"## {task}", "", protocol.split("\n\n")[0], "", study_table(tables[task]), ""]
    finetuned, unscored = held_out(cfg, students)
    missing += [f"fine-tuned {m}" for m in unscored]
    parameters = {students[r["spec"]].preset: r["parameters"] for rows in tables.values() for r in rows if r["spec"] in students}
    values = sweep_stats.run_values(tables, students) | values_of(finetuned)
    head = [f"# Distillation sweep: the whole grid, merged from the stages {', '.join(sorted(stages))}", "",
            f"Teacher `{cfg.teacher}`; students {', '.join(cfg.presets)} x T {cfg.temperatures} x lambda {cfg.lambdas}; "
            f"{len(students)} students, each probed once, in its stage (OUT/stages/NAME/ has its figures and timings).", ""]  # fmt: skip
    if missing:
        head += [f"Not in this report yet (no stage has run them; `distill sweep {config} --preset P --size N`): "
                 f"{', '.join(missing)}.", ""]  # fmt: skip
    path = out / "report.md"
    atomic_write_text(path, "\n".join(head + parts + [sweep_stats.section(values, parameters, out)]))
    return path, missing
