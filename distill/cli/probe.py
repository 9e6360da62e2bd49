"""``distill probe`` and ``distill evaluate``: frozen-embedding probes under one protocol (options from ProbeConfig)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from distill.cli.options import SPECS, Confidence, Device, MaxTokens, TargetPrecision, console, grouped
from distill.core.config import DEFAULT_CONFIDENCE, DEFAULT_TARGET_PRECISION, ProbeConfig

P = ProbeConfig(task="", data=[])  # the defaults
MLP_HIDDEN = 256

DataOpt = Annotated[
    list[str], typer.Option("--data", help="Labelled files, directories or globs (FASTA with labels in headers, Stockholm, TSV).")
]
TaskOpt = Annotated[
    str,
    typer.Option(
        help="Any name (letters, digits, _): labels kept as written; pfam (Pfam accession) and scope (SCOPe sccs at --level) are presets."
    ),
]
LevelOpt = Annotated[str, typer.Option(help="scope: class, fold, superfamily or family.")]
FieldOpt = Annotated[int, typer.Option(help="FASTA: the header field after the id that holds the label.")]
RegexOpt = Annotated[str | None, typer.Option(help="FASTA: a regex whose first group is the label, searched in the header.")]
WeightsOpt = Annotated[
    str,
    typer.Option(help="auto, none or balanced; auto is balanced only when every class has 5 training examples (the output says which)."),
]
ValidOpt = Annotated[
    list[str] | None, typer.Option("--valid", help="Labelled files for early stopping; default: 10% of the training part.")
]
TestOpt = Annotated[list[str] | None, typer.Option("--test", help="Separate labelled test files; default: split --data.")]
SplitOpt = Annotated[
    str,
    typer.Option(
        help="random (stratified), family-holdout (SCOPe superfamilies of unseen families) or superfamily-holdout (folds of unseen superfamilies: --level fold)."
    ),
]
PoolingOpt = Annotated[str, typer.Option(help="Sequence embedding: mean over residues, or the cls token.")]
MlpOpt = Annotated[bool, typer.Option("--mlp", help=f"One hidden layer ({MLP_HIDDEN}, GELU) instead of softmax regression.")]
MinOpt = Annotated[int, typer.Option(help="Labels with fewer examples are dropped (and counted).")]
FractionOpt = Annotated[float, typer.Option(help="Test fraction of the random or held-out split.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of split and head training.")]
LabelsOpt = Annotated[Path | None, typer.Option(help="id<TAB>label file labelling plain-FASTA --data/--test by record id.")]


def probe_options(
    data: DataOpt,
    task: TaskOpt,
    test: TestOpt = None,
    split: SplitOpt = P.split,
    pooling: PoolingOpt = P.pooling,
    mlp: MlpOpt = False,
    min_per_class: MinOpt = P.min_per_class,
    test_fraction: FractionOpt = P.test_fraction,
    seed: SeedOpt = P.seed,
    max_tokens: MaxTokens = P.max_tokens,
    device: Device = "auto",
    labels: LabelsOpt = None,
    valid: ValidOpt = None,
    class_weights: WeightsOpt = P.class_weights,
    level: LevelOpt = P.level,
    label_field: FieldOpt = P.label_field,
    label_regex: RegexOpt = None,
) -> ProbeConfig:
    """The probe protocol's options, shared by `probe` and `evaluate`, as one checked ProbeConfig."""
    from distill.core.distributed import pick_device

    cfg = ProbeConfig(task=task, data=list(data), test=list(test) if test else None, valid=list(valid) if valid else None,
                      split=split, pooling=pooling, hidden=MLP_HIDDEN if mlp else 0, min_per_class=min_per_class,
                      test_fraction=test_fraction, seed=seed, max_tokens=max_tokens, device=str(pick_device(device)),
                      labels=str(labels) if labels else None, class_weights=class_weights, level=level,
                      label_field=label_field, label_regex=label_regex)  # fmt: skip
    cfg.rule()  # checks the task name, level and header rule before any work
    return cfg


@grouped("cfg", probe_options)
def probe(
    model: Annotated[str, typer.Argument(help=f"A torch model spec or composition: {SPECS}")],
    cfg: ProbeConfig,
    out: Annotated[Path | None, typer.Option(help="Head directory. [default: MODEL/heads/TASK for a bundle]")] = None,
    target_precision: TargetPrecision = DEFAULT_TARGET_PRECISION,
    confidence: Confidence = DEFAULT_CONFIDENCE,
) -> None:
    """Train a Pfam or SCOPe classification head on frozen embeddings and store it with the model."""
    from distill.core.calibration import describe, refusal
    from distill.core.spec import is_bundle
    from distill.inference.embeddings import featurizer
    from distill.recipes.evaluate import markdown_table, prepare, probe_one

    if out is None:
        if not is_bundle(Path(model)):
            raise ValueError(f"{model} is not a student bundle, so there is nowhere default to put the head: pass --out DIR")
        out = Path(model) / "heads" / cfg.task
    if not (0 < target_precision <= 1 and 0 <= confidence < 1):
        raise ValueError(f"--target-precision must be in (0, 1] and --confidence in [0, 1), got {target_precision} and {confidence}")
    prepared = prepare(cfg, console)
    feat = featurizer(model)
    result, _ = probe_one(feat, cfg, prepared, console, calibrate=(target_precision, confidence))
    result.head.save(out)
    m = result.metrics
    for note in result.notes:
        if note.startswith("class weights"):
            console.print(note)
    print(cfg.describe(m["classes"], m["n_train"], m["n_test"], m["class_weights"]))
    print()
    print(markdown_table([{"model": feat.name, "parameters": feat.parameters, **m, "perplexity": None}]))
    console.print(describe(result.head.card["calibration"]))
    if not result.head.card["calibration"]["reached"]:
        console.print(f"[yellow]warning:[/] {refusal(result.head.card['calibration'])}")
    console.print(f"head written to {out}")


@grouped("cfg", probe_options)
def evaluate(
    models: Annotated[list[str], typer.Argument(help=f"Models to compare, torch model specs or composition: {SPECS}")],
    cfg: ProbeConfig,
    ppl_data: Annotated[Path | None, typer.Option(help="Held-out FASTA for the perplexity column (same for every model).")] = None,
    baselines: Annotated[
        bool, typer.Option(help="Add rows: random init of the first bundle's size, amino-acid composition, cached ESM-2 8M/35M.")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="Report directory. [default: runs/eval-TASK]")] = None,
) -> None:
    """Probe several models under one protocol: one table (markdown, CSV, JSON) plus t-SNE, confusion and perplexity plots."""
    from distill.recipes.evaluate import evaluate_models, markdown_table

    out = out or Path("runs") / f"eval-{cfg.task}"
    rows = evaluate_models(models, cfg, out, console, ppl_data, baselines)
    print((out / "results.md").read_text().split("\n\n")[0])
    print()
    print(markdown_table(rows))
    console.print(f"wrote {out}/results.md, results.csv, results.json, tsne.png, confusion.png" + (", perplexity.png" if ppl_data else ""))


def register(app: typer.Typer, export_app: typer.Typer) -> None:
    app.command()(probe)
    app.command()(evaluate)
