"""``distill finetune`` and ``distill index``: the commands that make calls (registered on the app in cli.py).

Option defaults come from ``FinetuneConfig`` itself, so the help cannot disagree with what runs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from distill.cli.options import SPECS, Confidence, Device, MaxTokens, ScaleOut, TargetPrecision, console, grouped, scale_out
from distill.core.config import CLASS_WEIGHTS, DEFAULT_MAX_EVALUE, DEFAULT_TARGET_PRECISION, FinetuneConfig

D = FinetuneConfig(model="", data=[], task="", out="")  # the defaults

# The longer option types of `finetune`, declared once above it so the command reads as a list of its settings.
Task = Annotated[str, typer.Option(help="Any name (letters, digits, _): labels kept as written; pfam and scope are presets (Pfam accession, SCOPe sccs).")]  # fmt: skip
LabelledData = Annotated[list[str], typer.Option("--data", help="Labelled training files, directories or globs (FASTA headers, Stockholm, TSV).")]  # fmt: skip
LearningRate = Annotated[float | None, typer.Option(help="Peak learning rate (AdamW, 5% warm-up, cosine decay). [default: 3e-4 with LP-FT, else 1e-3]")]  # fmt: skip
ClassWeights = Annotated[str, typer.Option(help=f"{', '.join(CLASS_WEIGHTS)}: auto is balanced only when every class has 5 training examples (balanced trades top-1 accuracy for rare-class recall).")]  # fmt: skip
MinPerClass = Annotated[int, typer.Option(help="Classes with fewer training sequences leave the label set (they become no-call negatives).")]  # fmt: skip
NegativeRate = Annotated[float, typer.Option(help="Residue-shuffled copies per step (share of the step), trained towards 'none of these'.")]  # fmt: skip
Background = Annotated[Path | None, typer.Option(help="A whole proteome of mostly non-members (FASTA): real negatives in training, per-label thresholds from its held-out half, and a head that scans whole proteins for domains (docs/calls.md). Needs pyopal.")]  # fmt: skip
BackgroundRate = Annotated[float, typer.Option(help="With --background: crops of its proteins per step (share of the step), trained towards 'none of these'.")]  # fmt: skip
ContextRate = Annotated[float, typer.Option(help="With --background: share of training pieces put in a scan window between real flanks.")]  # fmt: skip
LpFt = Annotated[bool, typer.Option(help="Start from the linear probe's head (LP-FT). Either way a fine-tune that never beats the probe on validation keeps it.")]  # fmt: skip
Folds = Annotated[int | None, typer.Option(help="Decide probe vs fine-tune and calibrate on K-fold out-of-fold scores (the recipe K more times); 0: on the validation part. [default: 5 up to 2,000 labelled sequences, else 0]")]  # fmt: skip


def finetune(
    model: Annotated[str, typer.Argument(help=f"Encoder to start from, a torch model spec: {SPECS}")],
    data: LabelledData,
    task: Task,
    out: Annotated[Path, typer.Option(help="Run directory; the fine-tuned bundle is OUT/model.")],
    valid: Annotated[list[str] | None, typer.Option("--valid", help="Labelled validation files (early stopping, calibration).")] = None,
    valid_fraction: Annotated[
        float, typer.Option(help="Without --valid: this fraction of each class (stratified) validates.")
    ] = D.valid_fraction,
    labels: Annotated[Path | None, typer.Option(help="id<TAB>label file for plain-FASTA --data / --valid.")] = None,
    level: Annotated[str, typer.Option(help="scope: class, fold, superfamily or family.")] = D.level,
    label_field: Annotated[int, typer.Option(help="FASTA: the header field after the id that holds the label.")] = D.label_field,
    label_regex: Annotated[str | None, typer.Option(help="FASTA: a regex whose first group is the label.")] = None,
    epochs: Annotated[int, typer.Option(help="At most this many epochs (early stopping may end sooner).")] = D.epochs,
    lr: LearningRate = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per optimizer step.")] = D.batch_size,
    max_tokens: MaxTokens = D.max_tokens,
    freeze_layers: Annotated[int, typer.Option(help="Keep the embeddings and the first N layers fixed.")] = D.freeze_layers,
    pooling: Annotated[str, typer.Option(help="Sequence embedding fed to the head: mean over residues, or cls.")] = D.pooling,
    head: Annotated[str, typer.Option(help="cosine (NormFace, for many small classes) or linear.")] = D.head,
    class_weights: ClassWeights = D.class_weights,
    min_per_class: MinPerClass = D.min_per_class,
    patience: Annotated[int, typer.Option(help="Stop after this many epochs without a better validation macro-F1.")] = D.patience,
    negative_rate: NegativeRate = D.negative_rate,
    background: Background = None,
    background_rate: BackgroundRate = D.background_rate,
    context_rate: ContextRate = D.context_rate,
    teacher: Annotated[str | None, typer.Option(help="Task distillation: a fine-tuned bundle with a head for TASK.")] = None,
    lam: Annotated[float, typer.Option(help="Weight of the teacher's soft targets: (1-lam) CE + lam T^2 KL.")] = D.lam,
    temperature: Annotated[float, typer.Option(help="Task-distillation temperature T.")] = D.temperature,
    target_precision: TargetPrecision = D.target_precision,
    confidence: Confidence = D.confidence,
    lp_ft: LpFt = D.lp_ft,
    folds: Folds = None,
    seed: Annotated[int, typer.Option(help="Seed of the head, the validation split, data order and crops.")] = D.seed,
    device: Device = D.device,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last epoch checkpoint (same options).")] = False,
    quiet: Annotated[bool, typer.Option(help="No per-epoch lines.")] = False,
) -> None:
    """Fine-tune an encoder end to end with a classification head; writes a calibrated bundle (OUT/model)."""
    from distill.recipes.finetune import finetune as run
    from distill.recipes.finetune_fallback import probe_kept

    cfg = FinetuneConfig(
        model=model, data=list(data), task=task, out=str(out), valid=list(valid) if valid else None, valid_fraction=valid_fraction,
        labels=str(labels) if labels else None, level=level, label_field=label_field, label_regex=label_regex, epochs=epochs, lr=lr, batch_size=batch_size, max_tokens=max_tokens,
        freeze_layers=freeze_layers, pooling=pooling, head=head, class_weights=class_weights, min_per_class=min_per_class,
        patience=patience, negative_rate=negative_rate, background=str(background) if background else None,
        background_rate=background_rate, context_rate=context_rate, teacher=teacher, lam=lam, temperature=temperature,
        target_precision=target_precision, confidence=confidence, lp_ft=lp_ft, folds=folds, seed=seed, device=device, quiet=quiet,
    )  # fmt: skip
    result = run(cfg, resume, console)
    if result.bundle is None:
        raise typer.Exit(130)
    kept = "the linear probe's head, kept" if probe_kept(result.metrics) else f"best epoch {result.metrics['best_epoch']}"
    console.print(f"fine-tuned bundle: {result.bundle} ({kept})")


@grouped("scale", scale_out)
def index(
    model: Annotated[
        str,
        typer.Argument(help=f"The model whose embeddings are indexed, a torch model spec: {SPECS}"),
    ],
    data: Annotated[list[str], typer.Option("--data", help="Labelled reference files (FASTA headers, Stockholm, TSV).")],
    task: Annotated[str, typer.Option(help="The task name (as for finetune): pfam and scope read their label formats.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Index directory.")],
    append: Annotated[bool, typer.Option(help="Add the sequences to an existing index (same model, new ids).")] = False,
    labels: Annotated[Path | None, typer.Option(help="id<TAB>label file for plain-FASTA --data.")] = None,
    pooling: Annotated[str, typer.Option(help="mean or cls; a bundle's fine-tuned head decides when not given.")] = "",
    target_precision: Annotated[float, typer.Option(help="The similarity threshold is set for this precision.")] = DEFAULT_TARGET_PRECISION,
    align: Annotated[int, typer.Option(help="Re-rank this many nearest references per query by Smith-Waterman (0: cosine calls).")] = 0,
    kmer: Annotated[
        bool,
        typer.Option(help="With --align N: also align the N references sharing the most 4-mers with the query (distill.inference.kmers)."),
    ] = True,
    background: Annotated[
        Path | None,
        typer.Option(
            help="With --align N: a whole proteome (FASTA) of mostly non-members; each label's threshold is raised above its real non-members there (docs/calls.md)."
        ),
    ] = None,
    max_evalue: Annotated[
        float, typer.Option(help="With --align N: no call weaker than this E-value over the whole index, whatever the calibration allows.")
    ] = DEFAULT_MAX_EVALUE,
    max_tokens: MaxTokens = D.max_tokens,
    device: Device = D.device,
    *,
    scale: ScaleOut,
) -> None:
    """Embed labelled reference sequences into an index for annotation transfer (`annotate --reference`)."""
    from distill.recipes.index_build import index_command

    idx = index_command(model, list(data), task, output, append, labels, pooling, target_precision, max_tokens, device, console, align,
                        scale.ray, scale.shard, scale.threads, kmer, background, max_evalue)  # fmt: skip
    if scale.shard is not None:
        i, n = scale.shard
        console.print(f"{output}: part {i}/{n} of the index; join all parts with `distill merge PARTS... -o INDEX`")
        return
    c = idx.card["calibration"]
    cut = f"E-value above {math.exp(-c['threshold']):.3g}" if idx.align else f"cosine below {c['threshold']:.4f}"
    floor = f" (--max-evalue {c['max_evalue']:g}; precision alone: {math.exp(-c['target_threshold']):.3g})" if idx.align else ""
    console.print(f"{output}: {len(idx)} references, {idx.card['labels']} labels; leave-one-out accuracy "
                  f"{c['leave_one_out_accuracy']:.3f}; no-call at {cut}{floor} for precision >= {c['target_precision']} "
                  f"(coverage {c['coverage']:.3f}; negatives: {c['n_negatives']} shuffled, {c.get('n_outside', 0)} of left-out labels)")  # fmt: skip
    if "background" in c:
        b = c["background"]
        console.print(f"background {b['name']}: {b['proteins']} proteins, {b['presumed_members']} presumed members left out; "
                      f"{b['raised']} labels' thresholds raised above their real non-members")  # fmt: skip


def register(app: typer.Typer, export_app: typer.Typer) -> None:
    app.command()(finetune)
    app.command()(index)
