"""The ``distill`` command line (Typer)."""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    help="Distil ESM-1b into small protein language models, and put them to work.", no_args_is_help=True, pretty_exceptions_enable=False
)
export_app = typer.Typer(help="Export a student bundle to other formats.", no_args_is_help=True)
app.add_typer(export_app, name="export")
console = Console(stderr=True, soft_wrap=True)  # never hard-wrap messages in logs

# The errors a user can cause; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, RuntimeError)


def fail(e: BaseException) -> None:
    console.print(f"[bold red]error:[/] {e}")
    raise typer.Exit(2)


@app.command()
def fit(
    data: Annotated[Path | None, typer.Argument(help="Training FASTA (.fa/.fasta, optionally .gz).")] = None,
    valid: Annotated[Path | None, typer.Option(help="Validation FASTA; default: a stable hash split of DATA.")] = None,
    valid_fraction: Annotated[
        float | None, typer.Option(help="Fraction of DATA held out for validation (by id hash). [default: 0.05]")
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="Student size: small (1.2M), medium (5.6M), large (33.7M) or custom. [default: small]")
    ] = None,
    layers: Annotated[int | None, typer.Option(help="Override the preset's layers.")] = None,
    dim: Annotated[int | None, typer.Option(help="Override the preset's embedding dim (FFN follows as 2 x dim).")] = None,
    heads: Annotated[int | None, typer.Option(help="Override the preset's attention heads.")] = None,
    ffn: Annotated[int | None, typer.Option(help="Override the FFN width.")] = None,
    teacher: Annotated[
        str | None, typer.Option(help="fair-esm model name or path to a fair-esm .pt. [default: esm1b_t33_650M_UR50S]")
    ] = None,
    temperature: Annotated[float | None, typer.Option(help="Distillation temperature T. [default: 2.0]")] = None,
    lam: Annotated[float | None, typer.Option(help="Weight of the KD term; 0 = vanilla MLM, no teacher loaded. [default: 0.5]")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs. [default: 10/20/30 for small/medium/large]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per optimizer step. [default: 512/128/64]")] = None,
    max_tokens: Annotated[
        int | None, typer.Option(help="Token budget of one forward pass; gradient accumulation makes up the batch. [default: 8192]")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (AdamW). [default: 1e-3]")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay (not on biases/norms). [default: 0.01]")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warm-up steps before cosine decay. [default: 5% of steps]")] = None,
    clip_norm: Annotated[float | None, typer.Option(help="Gradient clipping max norm. [default: 1.0]")] = None,
    mask_rate: Annotated[
        float | None, typer.Option(help="Fraction of residues masked (80/10/10 BERT replacement). [default: 0.15]")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for init, data order, cropping and masking. [default: 0]")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda. [default: auto]")] = None,
    save_every_minutes: Annotated[
        float | None, typer.Option(help="Checkpoint at least this often (also every epoch). [default: 10]")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop with a checkpoint after this many steps (resume later).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory.")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this directory from its last checkpoint.")] = None,
    config: Annotated[Path | None, typer.Option(help="JSON config (e.g. a run's config.json); options given here override it.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar or log lines.")] = False,
) -> None:
    """Distil a teacher into a student: masked LM + knowledge distillation."""
    from distill.train import FitConfig
    from distill.train import fit as run_fit

    given = {k: v for k, v in locals().items() if k in {f.name for f in fields(FitConfig)} and v is not None and v is not False}
    given = {k: str(v) if isinstance(v, Path) else v for k, v in given.items()}
    try:
        cfg = _resume_config(resume, given) if resume is not None else _fresh_config(config, given)
        result = run_fit(cfg, resume=resume is not None)
    except USER_ERRORS as e:
        fail(e)
    if not result.completed:
        raise typer.Exit(130)


def _fresh_config(config: Path | None, given: dict):
    """Defaults <- --config file <- options given on the command line."""
    from distill.io import read_json_object
    from distill.train import FitConfig

    merged = {**(read_json_object(config, "--config") if config else {}), **given}
    if "data" not in merged:
        raise ValueError("missing DATA (the training FASTA)")
    if "out" not in merged:
        raise ValueError("missing --out RUN_DIR")
    return FitConfig.from_json(merged)


def _resume_config(resume: Path, given: dict):
    """The run's saved config; only device/--max-steps/checkpoint cadence/--quiet may change."""
    from distill.io import read_json_object
    from distill.train import RESUME_OVERRIDABLE, FitConfig

    saved = read_json_object(resume / "config.json", "run config")
    clash = sorted(k for k, v in given.items() if k not in RESUME_OVERRIDABLE and k != "out" and saved.get(k) != v)
    if "out" in given and Path(given["out"]).resolve() != resume.resolve():
        clash.append("out")
    if clash:
        raise ValueError(f"--resume continues {resume} with its saved config; these options differ from it: {', '.join(clash)}")
    overrides = {k: v for k, v in given.items() if k in RESUME_OVERRIDABLE}
    return FitConfig.from_json({**saved, **overrides, "out": str(resume)})


@app.command("teacher-cache")
def teacher_cache_cmd(
    data: Annotated[Path, typer.Argument(help="The training FASTA the students will use (the whole file; any validation split works).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Cache directory (an interrupted build resumes into it).")],
    teacher: Annotated[str, typer.Option(help="fair-esm model name or path to a fair-esm .pt.")] = "esm1b_t33_650M_UR50S",
    views: Annotated[int, typer.Option(help="K fixed maskings per sequence; training epoch e uses view e mod K.")] = 1,
    seed: Annotated[int, typer.Option(help="Masking seed: must equal the --seed of the runs that use the cache.")] = 0,
    mask_rate: Annotated[float, typer.Option(help="Fraction of residues masked: must equal the runs' --mask-rate.")] = 0.15,
    max_tokens: Annotated[int, typer.Option(help="Token budget of one teacher forward pass.")] = 8192,
    shard_size: Annotated[int, typer.Option(help="Records per shard file.")] = 4096,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Run the teacher once over K maskings of DATA and store its logits, for any number of students."""
    from distill import data as data_mod
    from distill import teacher_cache
    from distill.train import Distributed, load_teacher, pick_device

    try:
        if views < 1 or shard_size < 1:
            raise ValueError("--views and --shard-size must be at least 1")
        dev = pick_device(device, Distributed())
        seqs = data_mod.load_fasta(data)
        net, sha = load_teacher(teacher, dev)
        key = teacher_cache.CacheKey(
            teacher=teacher, teacher_sha256=sha, data_sha256=data_mod.dataset_fingerprint(data),
            n_records=len(seqs), mask_rate=mask_rate, seed=seed, views=views,
        )  # fmt: skip
        stats = teacher_cache.build(seqs, net, key, output, max_tokens, dev, shard_size, quiet)
    except USER_ERRORS as e:
        fail(e)
    console.print(
        f"teacher cache {output}: {views} view(s) of {len(seqs)} sequences, {stats['bytes'] / 1e6:.1f} MB, "
        f"teacher ran {stats['seconds']:.1f}s ({stats['tokens'] / max(stats['seconds'], 1e-9):,.0f} tokens/s)"
    )


@app.command()
def perplexity(
    model: Annotated[str, typer.Argument(help="Student bundle directory, fair-esm model name, or fair-esm .pt.")],
    fasta: Annotated[Path, typer.Argument(help="FASTA to evaluate on.")],
    max_tokens: Annotated[int, typer.Option(help="Token budget per forward pass.")] = 8192,
    mask_rate: Annotated[float, typer.Option(help="Fraction of residues masked.")] = 0.15,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Masked-LM perplexity with the fixed evaluation masking (comparable across models)."""
    from distill.bundle import load_any
    from distill.data import load_fasta
    from distill.evaluate import perplexity as ppl
    from distill.train import Distributed, pick_device

    try:
        dev = pick_device(device, Distributed())
        net, card = load_any(model)
        seqs = load_fasta(fasta)
        value, n = ppl(net.to(dev), seqs, max_tokens, dev, mask_rate)
    except USER_ERRORS as e:
        fail(e)
    params = card.get("parameters", 0)
    print(
        json.dumps(
            {
                "model": model,
                "parameters": params,
                "fasta": str(fasta),
                "sequences": len(seqs),
                "masked_positions": n,
                "perplexity": round(value, 4),
            }
        )
    )


# ---- probing and evaluation ------------------------------------------------------------------------

DataOpt = Annotated[
    list[str], typer.Option("--data", help="Labelled files, directories or globs (FASTA with labels in headers, Stockholm, TSV).")
]
TaskOpt = Annotated[str, typer.Option(help="pfam (Pfam accession) or scope (SCOPe superfamily).")]
TestOpt = Annotated[list[str] | None, typer.Option("--test", help="Separate labelled test files; default: split --data.")]
SplitOpt = Annotated[str, typer.Option(help="random (stratified) or family-holdout (SCOPe remote homology).")]
PoolingOpt = Annotated[str, typer.Option(help="Sequence embedding: mean over residues, or the cls token.")]
MlpOpt = Annotated[bool, typer.Option("--mlp", help="One hidden layer (256, GELU) instead of softmax regression.")]
MinOpt = Annotated[int, typer.Option(help="Labels with fewer examples are dropped (and counted).")]
FractionOpt = Annotated[float, typer.Option(help="Test fraction of the random / family-holdout split.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of split and head training.")]
TokensOpt = Annotated[int, typer.Option(help="Token budget per forward pass when embedding.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
LabelsOpt = Annotated[Path | None, typer.Option(help="id<TAB>label file labelling plain-FASTA --data/--test by record id.")]


def _probe_config(task, data, test, split, pooling, mlp, min_per_class, test_fraction, seed, max_tokens, device, labels=None):  # noqa: ANN001, ANN202
    from distill.report import ProbeConfig
    from distill.train import Distributed, pick_device

    if task not in ("pfam", "scope"):
        raise ValueError(f"--task must be pfam or scope, got {task!r}")
    dev = str(pick_device(device, Distributed()))
    return ProbeConfig(
        task,
        list(data),
        list(test) if test else None,
        split,
        pooling,
        256 if mlp else 0,
        min_per_class,
        test_fraction,
        seed,
        max_tokens,
        dev,
        str(labels) if labels else None,
    )


@app.command()
def probe(
    model: Annotated[str, typer.Argument(help="Student bundle, fair-esm name or .pt, random:PRESET, or composition.")],
    data: DataOpt,
    task: TaskOpt,
    test: TestOpt = None,
    split: SplitOpt = "random",
    pooling: PoolingOpt = "mean",
    mlp: MlpOpt = False,
    min_per_class: MinOpt = 10,
    test_fraction: FractionOpt = 0.2,
    seed: SeedOpt = 0,
    max_tokens: TokensOpt = 8192,
    device: DeviceOpt = "auto",
    labels: LabelsOpt = None,
    out: Annotated[Path | None, typer.Option(help="Head directory. [default: MODEL/heads/TASK for a bundle]")] = None,
) -> None:
    """Train a Pfam or SCOPe classification head on frozen embeddings and store it with the model."""
    from distill.bundle import is_bundle
    from distill.embeddings import featurizer
    from distill.report import markdown_table, prepare, probe_one

    try:
        cfg = _probe_config(task, data, test, split, pooling, mlp, min_per_class, test_fraction, seed, max_tokens, device, labels)
        if out is None:
            if not is_bundle(Path(model)):
                raise ValueError(f"{model} is not a student bundle, so there is nowhere default to put the head: pass --out DIR")
            out = Path(model) / "heads" / task
        prepared = prepare(cfg, console)
        feat = featurizer(model)
        result, _ = probe_one(feat, cfg, prepared, console, calibrate=True)
        result.head.save(out)
    except USER_ERRORS as e:
        fail(e)
    m = result.metrics
    print(cfg.describe(m["classes"], m["n_train"], m["n_test"]))
    print()
    print(markdown_table([{"model": feat.name, "parameters": feat.parameters, **m, "perplexity": None}]))
    from distill.calibration import describe

    console.print(describe(result.head.card["calibration"]))
    console.print(f"head written to {out}")


@app.command()
def evaluate(
    models: Annotated[
        list[str], typer.Argument(help="Models to compare: bundles, fair-esm names or .pt files, random:PRESET, composition.")
    ],
    data: DataOpt,
    task: TaskOpt,
    test: TestOpt = None,
    split: SplitOpt = "random",
    pooling: PoolingOpt = "mean",
    mlp: MlpOpt = False,
    min_per_class: MinOpt = 10,
    test_fraction: FractionOpt = 0.2,
    seed: SeedOpt = 0,
    max_tokens: TokensOpt = 8192,
    device: DeviceOpt = "auto",
    labels: LabelsOpt = None,
    ppl_data: Annotated[Path | None, typer.Option(help="Held-out FASTA for the perplexity column (same for every model).")] = None,
    baselines: Annotated[
        bool, typer.Option(help="Add rows: random init of the first bundle's size, amino-acid composition, cached ESM-2 8M/35M.")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="Report directory. [default: eval-TASK]")] = None,
) -> None:
    """Probe several models under one protocol: one table (markdown, CSV, JSON) plus t-SNE, confusion and perplexity plots."""
    from distill.report import evaluate_models, markdown_table

    out = out or Path(f"eval-{task}")
    try:
        cfg = _probe_config(task, data, test, split, pooling, mlp, min_per_class, test_fraction, seed, max_tokens, device, labels)
        rows = evaluate_models(models, cfg, out, console, ppl_data, baselines)
    except USER_ERRORS as e:
        fail(e)
    print((out / "results.md").read_text().split("\n\n")[0])
    print()
    print(markdown_table(rows))
    console.print(f"wrote {out}/results.md, results.csv, results.json, tsne.png, confusion.png" + (", perplexity.png" if ppl_data else ""))


@app.command()
def sweep(config: Annotated[Path, typer.Argument(help="Sweep config (TOML): presets x temperatures x lambdas, tasks, teacher.")]) -> None:
    """Train a grid of students, probe them and the teacher on Pfam/SCOPe, and write a report (resumable)."""
    from distill.sweep import run_sweep

    try:
        path = run_sweep(config, console)
    except USER_ERRORS as e:
        fail(e)
    print(path.read_text())
    console.print(f"report: {path}")


@app.command()
def annotate(
    input: Annotated[Path, typer.Argument(help="FASTA to annotate (.gz works); streamed, any size.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output TSV: one row per input record.")],
    model: Annotated[
        str | None, typer.Option(help="Student bundle, exported .onnx (with --heads), or fair-esm name / .pt (ESM-1b).")
    ] = None,
    url: Annotated[str | None, typer.Option(help="Use a running `distill serve` service instead of a local model.")] = None,
    tasks: Annotated[
        str | None, typer.Option(help="Comma-separated heads to call (pfam,scope). [default: every head of the model]")
    ] = None,
    top_k: Annotated[int, typer.Option(help="Labels (with probabilities) per task and record.")] = 1,
    embeddings: Annotated[Path | None, typer.Option(help="Also write embeddings: .h5 (one dataset per id), .parquet or .npy.")] = None,
    long: Annotated[str, typer.Option(help="Over 1,022 residues: windows (overlapping, averaged) or crop (leading 1,022).")] = "windows",
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run of the same command.")] = False,
    heads: Annotated[str | None, typer.Option(help="Head directory for a fair-esm model (written by distill probe --out).")] = None,
    providers: Annotated[str, typer.Option(help="auto (GPU when present), cpu, cuda or tensorrt.")] = "auto",
    max_tokens: Annotated[int, typer.Option(help="Token budget per forward pass.")] = 16384,
    chunk_records: Annotated[int, typer.Option(help="Records per chunk: the unit of length sorting and of resume.")] = 1024,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    min_probability: Annotated[
        float | None, typer.Option(help="Write '-' (no call) below this top probability. [default: each head's calibrated threshold]")
    ] = None,
    reference: Annotated[
        Path | None, typer.Option(help="A `distill index` directory: nearest labelled references beside the calls.")
    ] = None,
    reference_k: Annotated[int, typer.Option(help="Reference neighbours per record (id, label, cosine similarity).")] = 3,
) -> None:
    """Annotate every record of a FASTA: TSV calls per task (+ embeddings), nothing dropped, resumable."""
    from distill.annotate import Options
    from distill.annotate import annotate as run

    try:
        if (model is None) == (url is None):
            raise ValueError("give exactly one of --model (run locally) or --url (use a running service)")
        if url:
            from distill.http_backend import HttpBackend

            backend = HttpBackend(url)
        else:
            from export.runtime import load_embedder

            backend = load_embedder(model, heads, providers, max_tokens)
        task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
        opts = Options(task_list, top_k, embeddings, long, resume, chunk_records, quiet, min_probability, reference, reference_k)
        summary = run(input, backend, output, opts, console)
    except USER_ERRORS as e:
        fail(e)
    rate = summary.records / summary.seconds if summary.seconds else 0.0
    console.print(
        f"{summary.records} records: {summary.ok} ok, {summary.errors} error -> {summary.output}"
        + (f", embeddings {summary.embeddings}" if summary.embeddings else "")
        + (f" ({rate:,.0f} records/s, {summary.residues / summary.seconds:,.0f} residues/s)" if summary.seconds else "")
    )


@app.command("import")
def import_cmd(
    model: Annotated[str, typer.Argument(help="Student bundle (exported to ONNX with its heads on the way) or an exported .onnx.")],
    name: Annotated[str | None, typer.Option(help="Model-store name. [default: esm-distill-<bundle or file name>]")] = None,
    int8: Annotated[bool, typer.Option(help="Also store the int8 graph (serve it with --variant int8).")] = False,
) -> None:
    """Put a student into BentoML's model store (what `distill serve` and `bentoml build` use)."""
    from serve.store import import_model

    try:
        tag = import_model(model, name, int8)
    except USER_ERRORS as e:
        fail(e)
    print(tag)


@app.command()
def serve(
    model: Annotated[
        str,
        typer.Argument(
            help="Model-store tag (name:version), student bundle or exported .onnx (imported first); with --backend esm1b a fair-esm name or .pt."
        ),
    ],
    port: Annotated[int, typer.Option(help="HTTP port.")] = 3000,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    backend: Annotated[
        str, typer.Option(help="student-onnx (ONNX Runtime; CUDA when present), student-torch, or esm1b (MODEL is a fair-esm name / .pt).")
    ] = "student-onnx",
    heads: Annotated[Path | None, typer.Option(help="With --backend esm1b: its heads (distill probe MODEL --out DIR/<task>).")] = None,
    variant: Annotated[str, typer.Option(help="fp32 or int8 (needs `distill import --int8`).")] = "fp32",
    compare_with: Annotated[str | None, typer.Option(help="Comparison model for /compare: esm1b_t33_650M_UR50S or a fair-esm .pt.")] = None,
    compare_heads: Annotated[
        Path | None, typer.Option(help="Heads of the comparison model (distill probe MODEL --out DIR/<task>).")
    ] = None,
    batching: Annotated[bool, typer.Option(help="Adaptive batching across concurrent requests.")] = True,
    reference: Annotated[Path | None, typer.Option(help="A `distill index` directory: /classify adds nearest labelled references.")] = None,
) -> None:
    """Serve a student with BentoML: /embed, /classify, /compare, /annotate, /info, /health (+ /readyz, /livez, /metrics)."""
    import os
    import subprocess

    from serve.store import BACKENDS, import_model

    try:
        if reference is not None and not (reference / "index.json").is_file():
            raise ValueError(f"--reference {reference} is not a `distill index` directory (no index.json)")
        if backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        tag = model
        if backend == "esm1b":
            from distill.pretrained import is_fair_esm_spec

            if not is_fair_esm_spec(model):
                raise ValueError(f"--backend esm1b serves a fair-esm model: give its name or a .pt, not {model!r}")
        elif Path(model).exists():
            tag = import_model(model, None, variant == "int8")
            console.print(f"imported {model} as {tag}")
        else:
            import bentoml

            try:
                bentoml.models.get(model)
            except bentoml.exceptions.NotFound as e:
                raise ValueError(f"{model} is neither a path nor a model in the BentoML store (`bentoml models list`)") from e
    except USER_ERRORS as e:
        fail(e)
    env = {
        **os.environ,
        "ESM_DISTILL_MODEL": tag if backend != "esm1b" else "",
        "ESM_DISTILL_ESM1B": model if backend == "esm1b" else "",
        "ESM_DISTILL_ESM1B_HEADS": str(heads or ""),
        "ESM_DISTILL_BACKEND": backend,
        "ESM_DISTILL_VARIANT": variant,
        "ESM_DISTILL_COMPARE": compare_with or "",
        "ESM_DISTILL_COMPARE_HEADS": str(compare_heads or ""),
        "ESM_DISTILL_BATCHING": "1" if batching else "0",
        "ESM_DISTILL_REFERENCE": str(reference.resolve()) if reference else "",
    }
    cmd = [sys.executable, "-m", "bentoml", "serve", "serve.service:EsmDistillService", "--port", str(port), "--host", host]
    console.print(f"serving {tag} on http://{host}:{port} ({backend}, {variant}): {' '.join(cmd[2:])}")
    raise typer.Exit(subprocess.call(cmd, env=env))


@export_app.command("esm")
def export_esm(
    bundle: Annotated[Path, typer.Argument(help="Student bundle directory.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .pt (its -contact-regression.pt is written beside it).")],
) -> None:
    """Write a student as a fair-esm checkpoint that esm.pretrained.load_model_and_alphabet_local opens."""
    from distill.bundle import load_bundle
    from distill.pretrained import save_fair_esm

    try:
        model, _ = load_bundle(bundle)
        paths = save_fair_esm(model, output)
    except USER_ERRORS as e:
        fail(e)
    console.print(f"wrote {paths[0]} and {paths[1]}")


@export_app.command("onnx")
def export_onnx(
    model: Annotated[str, typer.Argument(help="Student bundle directory, or a fair-esm model name / .pt (ESM-1b comparison backend).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .onnx (fp32); variants are written beside it.")],
    opset: Annotated[int, typer.Option(help="ONNX opset of the fp32 graph (17-21).")] = 18,
    fp16: Annotated[bool, typer.Option(help="Also write NAME.fp16.onnx (fp16 weights and compute, fp32 I/O).")] = False,
    int8: Annotated[bool, typer.Option(help="Also write NAME.int8.onnx (ONNX Runtime dynamic int8 quantisation).")] = False,
    optimize: Annotated[
        bool, typer.Option(help="Also write NAME.opt.onnx (ONNX Runtime transformer fusions), kept only if parity holds.")
    ] = False,
    trt: Annotated[bool, typer.Option(help="Also write NAME.trt.onnx for TensorRT (opset 17, int32 input, checked op list).")] = False,
    heads: Annotated[
        bool, typer.Option(help="Add <task>_probabilities outputs from the bundle's heads (written by `distill probe`).")
    ] = False,
) -> None:
    """Export a student (or ESM-1b) to ONNX: checked graph, parity report, optional fp16/int8/optimized/TensorRT variants."""
    from distill.bundle import is_bundle, load_any
    from distill.probe import heads_of
    from export.onnx import TRT_PROFILE, ExportError, export, source_of, trt_readiness

    try:
        net, card = load_any(model)
        found = None
        if heads:
            found = heads_of(Path(model), net.cfg.dim) if is_bundle(Path(model)) else {}
            if not found:
                raise ExportError(
                    f"{model} has no classification heads: add them with `distill probe {model} --task pfam ...`, or export without --heads"
                )
        result = export(net, output, source_of(model, card), opset, fp16, int8, optimize, trt, heads=found)
    except (*USER_ERRORS, ExportError) as e:
        fail(e)
    print(f"{'variant':8s} {'file':40s} {'MB':>7s}  {'max|d logits|':>13s} {'max|d emb|':>11s} {'min cos':>9s} {'top-1 masked':>12s}")
    for r in result.reports:
        path = result.paths[r.variant]
        m = r.metrics
        print(f"{r.variant:8s} {str(path):40s} {path.stat().st_size / 1e6:7.2f}  {m['max_abs_logits']:13.2e} "
              f"{m['max_abs_sequence_embedding']:11.2e} {m['min_cosine_sequence_embedding']:9.6f} {m['min_top1_masked']:12.1%}")  # fmt: skip
    for variant, why in result.dropped.items():
        print(f"{variant:8s} dropped: parity did not hold ({why})")
    problems = trt_readiness(result.paths["fp32"])
    if "trt" in result.paths:
        lo, opt, hi = (f"tokens:{b}x{n}" for b, n in TRT_PROFILE.values())
        print(f"TensorRT: {result.paths['trt']} is ready; build an engine with:\n  trtexec --onnx={result.paths['trt']} "
              f"--minShapes={lo} --optShapes={opt} --maxShapes={hi} --fp16 --saveEngine={result.paths['trt'].with_suffix('.plan')}")  # fmt: skip
    else:
        print(f"TensorRT: the fp32 graph is not TensorRT 8.5-ready ({'; '.join(problems)}); add --trt for a graph that is")


def _register_call_commands() -> None:
    from distill import cli_calls  # its own module: this one is long enough

    app.command()(cli_calls.finetune)
    app.command()(cli_calls.index)


_register_call_commands()


def main() -> None:
    app(prog_name="distill")


if __name__ == "__main__":
    sys.exit(main())
