"""The ``distill`` command line (Typer): this module holds the app and the training commands.

Commands only parse and print; the work is in the recipes and libraries they call. Option defaults come from
the config dataclasses (``distill.core.config``), so ``--help`` shows what runs. Heavy modules (torch, fair-esm,
BentoML) are imported inside the commands that need them, so ``distill --help`` is fast and the ONNX path
of ``distill annotate`` never imports torch.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Annotated

import typer

from distill.cli import calls as cli_calls
from distill.cli import probe as cli_probe
from distill.cli import run as cli_run
from distill.cli.options import Commands, Device, MaxTokens, ScaleOut, console, grouped, scale_out
from distill.core.config import DEFAULT_TEACHER, PRESET_TRAINING, TRAIN_MAX_TOKENS, FitConfig

app = typer.Typer(
    cls=Commands,
    help="Distil ESM-1b into small protein language models, and put them to work.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "[default: 2.0]" must not be read as markup
)
export_app = typer.Typer(help="Export a student bundle to other formats.", no_args_is_help=True)
app.add_typer(export_app, name="export")
D = FitConfig(data="", out="")  # the defaults
EPOCHS = "/".join(str(e) for _, e in PRESET_TRAINING.values())
BATCHES = "/".join(str(b) for b, _ in PRESET_TRAINING.values())


@app.callback()
def options(debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of every error, bad input included.")] = False) -> None:
    """Distil ESM-1b into small protein language models, and put them to work."""


RECIPE = "A UniRep teacher with none of --lam, --rep-weight, --rep-loss, --rep-level: --lam 0 --rep-weight 70 --rep-loss mse (measured)."


def default(name: str) -> str:
    return f"[default: {getattr(D, name)}]"


@app.command()
def fit(
    data: Annotated[Path | None, typer.Argument(help="Training FASTA (.fa/.fasta, optionally .gz).")] = None,
    valid: Annotated[Path | None, typer.Option(help="Validation FASTA; default: a stable hash split of DATA.")] = None,
    valid_fraction: Annotated[
        float | None, typer.Option(help=f"Fraction of DATA held out for validation (by id hash). {default('valid_fraction')}")
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help=f"Student size: small (1.2M), medium (5.6M), large (33.7M) or custom. {default('preset')}")
    ] = None,
    layers: Annotated[int | None, typer.Option(help="Override the preset's layers.")] = None,
    dim: Annotated[int | None, typer.Option(help="Override the preset's embedding dim (FFN follows as 2 x dim).")] = None,
    heads: Annotated[int | None, typer.Option("--attention-heads", help="Override the preset's attention heads.")] = None,
    ffn: Annotated[int | None, typer.Option(help="Override the FFN width.")] = None,
    teacher: Annotated[
        str | None,
        typer.Option(help=f"The teacher, a torch model spec: a fair-esm name or .pt (ESM-1b), unirep1900, a bundle. {default('teacher')}"),
    ] = None,
    teacher_cache: Annotated[
        Path | None,
        typer.Option(help="Read the teacher from a `distill teacher-cache` directory instead of running it (no teacher is loaded)."),
    ] = None,
    temperature: Annotated[float | None, typer.Option(help=f"Distillation temperature T. {default('temperature')}")] = None,
    lam: Annotated[
        float | None,
        typer.Option(help=f"Weight of the KD term; 0 = vanilla MLM (no teacher loaded unless --rep-weight). {default('lam')} {RECIPE}"),
    ] = None,
    rep_weight: Annotated[
        float | None,
        typer.Option(
            help=f"Weight of representation distillation (a learned map of student states to the teacher's); 0 = off. {default('rep_weight')}"
        ),
    ] = None,
    rep_loss: Annotated[str | None, typer.Option(help=f"Representation distance: cosine or mse. {default('rep_loss')}")] = None,
    rep_level: Annotated[
        str | None, typer.Option(help=f"Representation level: pooled (sequence embedding), residue, or both. {default('rep_level')}")
    ] = None,
    rep_centre: Annotated[
        bool | None,
        typer.Option(
            help=f"Centre the teacher's states on their running mean before comparing (a protein LM's embeddings share one direction). {default('rep_centre')}"
        ),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help=f"Epochs. [default: {EPOCHS} for small/medium/large]")] = None,
    batch_size: Annotated[int | None, typer.Option(help=f"Sequences per optimizer step. [default: {BATCHES}]")] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option(help=f"Token budget of one forward pass; gradient accumulation makes up the batch. {default('max_tokens')}"),
    ] = None,
    lr: Annotated[float | None, typer.Option(help=f"Peak learning rate (AdamW). {default('lr')}")] = None,
    weight_decay: Annotated[float | None, typer.Option(help=f"AdamW weight decay (not on biases/norms). {default('weight_decay')}")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warm-up steps before cosine decay. [default: 5% of steps]")] = None,
    clip_norm: Annotated[float | None, typer.Option(help=f"Gradient clipping max norm. {default('clip_norm')}")] = None,
    mask_rate: Annotated[
        float | None, typer.Option(help=f"Fraction of residues masked (80/10/10 BERT replacement). {default('mask_rate')}")
    ] = None,
    seed: Annotated[int | None, typer.Option(help=f"Seed for init, data order, cropping and masking. {default('seed')}")] = None,
    device: Annotated[str | None, typer.Option(help=f"auto, cpu or cuda. {default('device')}")] = None,
    save_every_minutes: Annotated[
        float | None, typer.Option(help=f"Checkpoint at least this often (also every epoch). {default('save_every_minutes')}")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop with a checkpoint after this many steps (resume later).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory.")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this directory from its last checkpoint.")] = None,
    config: Annotated[Path | None, typer.Option(help="JSON config (e.g. a run's config.json); options given here override it.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar or log lines.")] = False,
) -> None:
    """Distil a teacher into a student: masked LM + knowledge distillation."""
    from distill.recipes.fit import fit as run_fit
    from distill.recipes.fit import teacher_kind

    given = {
        k: v
        for k, v in locals().items()
        if k in {f.name for f in fields(FitConfig)} and v is not None and (v is not False or k == "rep_centre")
    }
    given = {k: str(v) if isinstance(v, Path) else v for k, v in given.items()}
    cfg = FitConfig.for_resume(resume, given) if resume is not None else FitConfig.from_sources(config, given, teacher_kind)
    if not run_fit(cfg, resume=resume is not None).completed:
        raise typer.Exit(130)


@app.command("teacher-cache")
@grouped("scale", scale_out)
def teacher_cache_cmd(
    data: Annotated[Path, typer.Argument(help="The training FASTA the students will use (the whole file; any validation split works).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Cache directory (an interrupted build resumes into it).")],
    teacher: Annotated[
        str, typer.Option(help="The teacher, a torch model spec: a fair-esm name or .pt (ESM-1b), unirep1900, a bundle.")
    ] = DEFAULT_TEACHER,
    views: Annotated[int, typer.Option(help="K fixed maskings per sequence; training epoch e uses view e mod K.")] = 1,
    seed: Annotated[int, typer.Option(help="Masking seed: must equal the --seed of the runs that use the cache.")] = D.seed,
    mask_rate: Annotated[float, typer.Option(help="Fraction of residues masked: must equal the runs' --mask-rate.")] = D.mask_rate,
    max_tokens: MaxTokens = TRAIN_MAX_TOKENS,
    shard_size: Annotated[int, typer.Option(help="Records per shard file.")] = 4096,
    device: Device = D.device,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    *,
    scale: ScaleOut,
) -> None:
    """Run the teacher once over K maskings of DATA and store its logits, for any number of students."""
    from distill.recipes import teacher_cache

    output, stats, n = teacher_cache.build_command(
        data, output, teacher, views, seed, mask_rate, max_tokens, shard_size, device, quiet, scale.ray, scale.shard, scale.threads
    )
    part = f" (part {scale.shard[0]}/{scale.shard[1]} of the cache: join the parts with `distill merge`)" if scale.shard else ""
    console.print(
        f"teacher cache {output}{part}: {views} view(s) of {n} sequences, {stats['bytes'] / 1e6:.1f} MB, "
        f"teacher ran {stats['seconds']:.1f}s ({stats['tokens'] / max(stats['seconds'], 1e-9):,.0f} tokens/s)"
    )


@app.command()
def perplexity(
    model: Annotated[str, typer.Argument(help="Student bundle directory, fair-esm model name, or fair-esm .pt.")],
    fasta: Annotated[Path, typer.Argument(help="FASTA to evaluate on.")],
    max_tokens: MaxTokens = TRAIN_MAX_TOKENS,
    mask_rate: Annotated[float, typer.Option(help="Fraction of residues masked.")] = D.mask_rate,
    device: Device = D.device,
) -> None:
    """Masked-LM perplexity with the fixed evaluation masking (comparable across models)."""
    from distill.recipes.perplexity import perplexity_of

    print(json.dumps(perplexity_of(model, fasta, max_tokens, mask_rate, device)))


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="Sweep config (TOML): presets x temperatures x lambdas, tasks, teacher.")],
    presets: Annotated[
        list[str] | None,
        typer.Option("--preset", metavar="PRESET", help="Run one stage of the grid: only these presets (repeat)."),
    ] = None,
    sizes: Annotated[
        list[str] | None,
        typer.Option("--size", metavar="N|all", help="Run one stage of the grid: only these data sizes (repeat)."),
    ] = None,
    merge: Annotated[
        bool, typer.Option("--merge", help="Write the whole grid's report from its stages' probe rows (no training, no probing).")
    ] = False,
) -> None:
    """Train a grid of students, probe them and the teacher on Pfam/SCOPe, and write a report (resumable).

    A stage (--preset / --size) reports in OUT/stages/NAME/; a later stage or the whole grid resumes its cells.
    """
    if merge and (presets or sizes):
        raise ValueError("--merge reports the whole grid: drop --preset / --size")
    if merge:
        from distill.recipes.sweep.merge import merge_stages

        path, missing = merge_stages(config)
        print(path.read_text())
        console.print(f"report: {path}" + (f" ({len(missing)} cells not run yet, named at its top)" if missing else ""))
        return
    from distill.recipes.sweep.grid import run_sweep

    path = run_sweep(config, console, presets, sizes)
    print(path.read_text())
    console.print(f"report: {path}")


for module in (cli_probe, cli_run, cli_calls):
    module.register(app, export_app)


def main() -> None:
    app(prog_name="distill")


if __name__ == "__main__":
    sys.exit(main())
