"""The commands that put a model to work: ``annotate``, ``import``, ``serve``, ``export onnx`` and ``export esm``.

``annotate`` with an ``.onnx`` model (or ``--url``) runs without torch: everything torch-side is imported inside
the branches that need it.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from distill.cli.options import SPECS, MaxTokens, ScaleOut, console, grouped, scale_out, task_list
from distill.core.config import INFERENCE_MAX_TOKENS, SERVE
from distill.recipes.annotate import LONG_POLICIES, Options

O = Options()  # the defaults  # noqa: E741


@grouped("scale", scale_out)
def annotate(
    input: Annotated[Path, typer.Argument(help="FASTA to annotate (.gz works); streamed, any size.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output TSV: one row per input record.")],
    model: Annotated[
        str | None,
        typer.Option(help=f"Any model spec (a fair-esm model takes its heads from --heads): {SPECS}"),
    ] = None,
    url: Annotated[str | None, typer.Option(help="Use a running `distill serve` service instead of a local model.")] = None,
    tasks: Annotated[
        str | None, typer.Option(help="Comma-separated heads to call (pfam,scope). [default: every head of the model]")
    ] = None,
    top_k: Annotated[int, typer.Option(help="Labels (with probabilities) per task and record.")] = O.top_k,
    embeddings: Annotated[Path | None, typer.Option(help="Also write embeddings: .h5 (one dataset per id), .parquet or .npy.")] = None,
    long: Annotated[
        str, typer.Option(help=f"Over 1,022 residues: {' or '.join(LONG_POLICIES)} (overlapping windows averaged, or the leading 1,022).")
    ] = O.long_policy,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run of the same command.")] = False,
    heads: Annotated[
        str | None, typer.Option("--head-dir", help="Head directory for a fair-esm model (written by distill probe --out).")
    ] = None,
    providers: Annotated[str, typer.Option(help="auto (GPU when present), cpu, cuda or tensorrt.")] = "auto",
    max_tokens: MaxTokens = INFERENCE_MAX_TOKENS,  # no backward pass: twice training's default
    chunk_records: Annotated[int, typer.Option(help="Records per chunk: the unit of length sorting and of resume.")] = O.chunk_records,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    min_probability: Annotated[
        float | None, typer.Option(help="Write '-' (no call) below this top probability. [default: each head's calibrated threshold]")
    ] = None,
    reference: Annotated[
        Path | None, typer.Option(help="A `distill index` directory: nearest labelled references beside the calls.")
    ] = None,
    reference_k: Annotated[int, typer.Option(help="Reference neighbours per record (id, label, cosine similarity).")] = O.reference_k,
    api_key: Annotated[str, typer.Option(envvar="ESM_DISTILL_API_KEY", help="With --url: the service's API key.")] = "",
    *,
    scale: ScaleOut,
) -> None:
    """Annotate every record of a FASTA: TSV calls per task (+ embeddings), nothing dropped, resumable."""
    from distill.inference import resolve
    from distill.recipes.annotate import annotate as run

    if (model is None) == (url is None):
        raise ValueError("give exactly one of --model (run locally) or --url (use a running service)")
    load = partial(resolve, url or model, heads, providers, max_tokens, api_key)
    inference = load(threads=scale.threads)
    opts = Options(tasks=task_list(tasks), top_k=top_k, embeddings=embeddings, long_policy=long, resume=resume, chunk_records=chunk_records,
                   quiet=quiet, min_probability=min_probability, reference=reference, reference_k=reference_k, shard=scale.shard)  # fmt: skip
    summary = run(input, inference, output, opts, console, scale.ray, load)
    rate = summary.records / summary.seconds if summary.seconds else 0.0
    console.print(
        f"{summary.records} records: {summary.ok} ok, {summary.errors} error -> {summary.output}"
        + (f", embeddings {summary.embeddings}" if summary.embeddings else "")
        + (f" ({rate:,.0f} records/s, {summary.residues / summary.seconds:,.0f} residues/s)" if summary.seconds else "")
    )


def merge(
    outputs: Annotated[
        list[Path],
        typer.Argument(help="Every part of one job, any order: annotate TSVs, teacher-cache directories or index parts (--shard I/N)."),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="The merged output (what one unsharded run writes).")],
    embeddings: Annotated[
        Path | None, typer.Option(help="annotate: also merge the shards' embeddings into this file (same format).")
    ] = None,
) -> None:
    """Join the parts of a sharded job in input order; refuses missing, duplicated, unfinished or foreign parts."""
    from distill.recipes.merge import merge_job

    console.print(merge_job(outputs, output, embeddings))


def import_cmd(
    model: Annotated[str, typer.Argument(help="Student bundle (exported to ONNX with its heads on the way) or an exported .onnx.")],
    name: Annotated[str | None, typer.Option(help="Model-store name. [default: esm-distill-<bundle or file name>]")] = None,
    int8: Annotated[bool, typer.Option(help="Also store the int8 graph (serve it with --variant int8).")] = False,
) -> None:
    """Put a student into BentoML's model store (what `distill serve` and `bentoml build` use)."""
    from serve.store import import_model

    print(import_model(model, name, int8))


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
    heads: Annotated[
        Path | None, typer.Option("--head-dir", help="With --backend esm1b: its heads (distill probe MODEL --out DIR/<task>).")
    ] = None,
    variant: Annotated[str, typer.Option(help="fp32 or int8 (needs `distill import --int8`).")] = "fp32",
    compare_with: Annotated[
        str | None,
        typer.Option(help="Comparison model for /compare, a torch model spec: esm1b_t33_650M_UR50S, a fair-esm .pt, unirep1900."),
    ] = None,
    compare_heads: Annotated[
        Path | None, typer.Option("--compare-head-dir", help="Heads of the comparison model (distill probe MODEL --out DIR/<task>).")
    ] = None,
    batching: Annotated[
        bool,
        typer.Option(
            help="Run the model as its own service with adaptive batching across requests (for GPUs; on a CPU one process is faster)."
        ),
    ] = False,
    reference: Annotated[Path | None, typer.Option(help="A `distill index` directory: /classify adds nearest labelled references.")] = None,
    max_sequences: Annotated[int, typer.Option(help="Sequences per request; more is a 400.")] = SERVE.max_sequences,
    max_residues: Annotated[int, typer.Option(help="Residues per request; more is a 400.")] = SERVE.max_residues,
    max_request_bytes: Annotated[
        int, typer.Option(help="Request body limit in bytes, checked before parsing (413). [default: from the two limits above]")
    ] = SERVE.max_request_bytes,
    api_key: Annotated[
        str, typer.Option(envvar="ESM_DISTILL_API_KEY", help="Require this key on every endpoint but health / metrics.")
    ] = "",
    client_timeout: Annotated[
        float, typer.Option(help="Seconds a client may take to send its request head (then closed) or its whole body (408).")
    ] = SERVE.client_timeout,
    max_concurrency: Annotated[
        int, typer.Option(help="Requests a worker takes on at once; more get 503 with Retry-After (bounds its memory).")
    ] = SERVE.max_concurrency,
) -> None:
    """Serve a student with BentoML: /embed, /classify, /compare, /annotate, /info, /health (+ /readyz, /livez, /metrics)."""
    from serve.launch import launch, serve_args

    args = serve_args(
        model, backend, variant, console, esm1b_heads=str(heads or ""), compare=compare_with or "", compare_heads=str(compare_heads or ""),
        batching=batching, reference=str(reference.resolve()) if reference else "", max_sequences=max_sequences, max_residues=max_residues,
        max_request_bytes=max_request_bytes, api_key=api_key, client_timeout=client_timeout, max_concurrency=max_concurrency,
    )  # fmt: skip
    raise typer.Exit(launch(args, host, port, console))


def export_esm(
    bundle: Annotated[Path, typer.Argument(help="Student bundle directory.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .pt (its -contact-regression.pt is written beside it).")],
) -> None:
    """Write a student as a fair-esm checkpoint that esm.pretrained.load_model_and_alphabet_local opens."""
    from distill.core.bundle import load_bundle
    from distill.core.pretrained import save_fair_esm

    paths = save_fair_esm(load_bundle(bundle)[0], output)
    console.print(f"wrote {paths[0]} and {paths[1]}")


def export_hf(
    model: Annotated[str, typer.Argument(help=f"A torch model spec (a bundle's heads go along as files): {SPECS}")],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Output directory: config.json, model.safetensors, tokenizer files, README.md.")
    ],
) -> None:
    """Write a model as a Hugging Face `EsmForMaskedLM` directory (AutoModelForMaskedLM / AutoTokenizer load it offline)."""
    from distill.core.bundle import load_any
    from distill.core.hf import export_hf as write
    from distill.core.spec import is_bundle

    net, card = load_any(model)
    out = write(net, card, output, Path(model) / "heads" if is_bundle(Path(model)) else None)
    console.print(f"wrote {out} (config.json, model.safetensors, vocab.txt, README.md" + (", heads/)" if (out / "heads").is_dir() else ")"))


def export_onnx(
    model: Annotated[str, typer.Argument(help=f"A torch model spec (a fair-esm model: the ESM-1b comparison backend): {SPECS}")],
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
    from export.onnx import export_command, summary

    print(summary(export_command(model, output, opset, fp16, int8, optimize, trt, heads)))


def register(app: typer.Typer, export_app: typer.Typer) -> None:
    app.command()(annotate)
    app.command()(merge)
    app.command("import")(import_cmd)
    app.command()(serve)
    export_app.command("esm")(export_esm)
    export_app.command("onnx")(export_onnx)
    export_app.command("hf")(export_hf)
