"""Student bundles (or ESM-1b) to ONNX graphs with one documented contract, checked on every export.

Graph contract (version 1), also written into the ONNX metadata:

    input   tokens              int64 [batch, length] (int32 for --trt), ESM-1b alphabet, right-padded
                                with <pad> (1), <cls> ... <eos> around each sequence, length <= 1024
    output  logits              float32 [batch, length, 33]
            residue_embeddings  float32 [batch, length, dim]  last layer, after the final layer norm
            sequence_embedding  float32 [batch, dim]          mean over real residues (no BOS/EOS/pad)
            <task>_probabilities float32 [batch, n_labels]    only with --heads: softmax of each head
                                (pfam, scope) over the labels listed in the metadata key ``labels``

Padding never changes an output at a real position. Variants written beside the fp32 graph:
``.fp16.onnx`` (weights and compute in fp16, fp32 inputs/outputs), ``.opt.onnx`` (attention as ONNX
Runtime's fused MultiHeadAttention, plus its transformer fusions), ``.int8.onnx`` (the fused-attention graph
with ONNX Runtime dynamic int8 quantisation of the encoder's MatMuls; embeddings, layer norms, the LM head and the
classification heads stay fp32), ``.trt.onnx`` (opset 17, int32 input,
layer norm decomposed: every op is in the TensorRT 8.5 parser's list). ``.opt`` and ``.int8`` use ONNX
Runtime contrib ops, so they run on ONNX Runtime only; the fp32, fp16 and ``.trt`` graphs are standard ONNX.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from distill.core import tokens
from distill.core.heads import heads_of
from distill.core.model import ESM
from distill.core.spec import parse_spec
from distill.inference.encoders import load_encoder
from distill.inference.onnx_backend import OUTPUTS
from export.graph import ExportError, decompose_layer_norms, export_graph, output_names, quiet_third_party
from export.parity import ONE_SEQUENCE, Parity, parity

CONTRACT_VERSION = 1

HERE = Path(__file__).resolve().parent
TRT_OPS_FILE = HERE / "tensorrt_ops.txt"
# TensorRT optimisation profile for `tokens` (batch x length): documented in the README with trtexec.
TRT_PROFILE = {"min": (1, 3), "opt": (32, 256), "max": (64, 1024)}


def _set_metadata(path: Path, meta: dict[str, Any]) -> None:
    proto = onnx.load(str(path), load_external_data=False)
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v if isinstance(v, str) else json.dumps(v))
    onnx.save(proto, str(path))


def read_metadata(path: Path) -> dict[str, Any]:
    proto = onnx.load(str(path), load_external_data=False)
    out = {}
    for p in proto.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except json.JSONDecodeError:
            out[p.key] = p.value
    return out


def check_graph(path: Path) -> None:
    """onnx.checker (full check) and strict shape inference; the contract's outputs must be there."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{path} fails the ONNX checker / shape inference: {e}") from e
    names = [o.name for o in inferred.graph.output]
    if names[:3] != OUTPUTS:
        raise ExportError(f"{path} outputs {names}, the contract needs {OUTPUTS}")


def trt_readiness(path: Path) -> list[str]:
    """Problems that would stop TensorRT's ONNX parser (empty list = ready)."""
    lines = [line.strip() for line in TRT_OPS_FILE.read_text().splitlines()]
    supported = {line for line in lines if line and not line.startswith("#")}
    max_opset = int(next(line.split(":")[1] for line in lines if line.startswith("# max_opset")))
    proto = onnx.load(str(path), load_external_data=False)
    problems = []
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > max_opset:
        problems.append(f"opset {opset} > {max_opset}")
    unsupported = sorted({n.op_type for n in proto.graph.node if n.op_type not in supported or n.domain not in ("", "ai.onnx")})
    if unsupported:
        problems.append(f"ops not in the TensorRT parser's list: {', '.join(unsupported)}")
    constants = {i.name for i in proto.graph.initializer} | {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    must_be_constant = {"CumSum": [1], "Slice": [3], "Squeeze": [1], "Unsqueeze": [1]}
    for n in proto.graph.node:
        for i in must_be_constant.get(n.op_type, []):
            if len(n.input) > i and n.input[i] and n.input[i] not in constants:
                problems.append(f"{n.op_type} {n.name}: input {i} must be a constant for TensorRT")
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        symbolic = {d for d in dims if isinstance(d, str)}
        if not symbolic <= {"batch", "length"}:
            problems.append(f"{value.name} has data-dependent dimensions {sorted(symbolic - {'batch', 'length'})}")
    if proto.graph.input[0].type.tensor_type.elem_type != onnx.TensorProto.INT32:
        problems.append("input tokens is int64 (TensorRT prefers int32: export with --trt)")
    return problems


def encoder_matmuls(graph: onnx.ModelProto) -> list[str]:
    """MatMul nodes with constant weights before the final layer norm (the graph is topologically sorted): the
    encoder's, which int8 quantises; the LM head and the classification heads after it stay fp32."""
    weights = {i.name for i in graph.graph.initializer}
    names = []
    for node in graph.graph.node:
        if "residue_embeddings" in node.output:
            break
        if node.op_type == "MatMul" and node.input[1] in weights:
            names.append(node.name)
    return names


@dataclass
class ExportResult:
    paths: dict[str, Path]
    reports: list[Parity]
    trt_problems: list[str]
    dropped: dict[str, str]


def _variant_path(out: Path, variant: str) -> Path:
    return out if variant == "fp32" else out.with_name(f"{out.stem}.{variant}.onnx")


def export(
    model: ESM,
    out: Path,
    source: dict[str, Any],
    opset: int = 18,
    fp16: bool = False,
    int8: bool = False,
    optimize: bool = False,
    trt: bool = False,
    strict: bool = True,
    heads: dict | None = None,
) -> ExportResult:
    """Write the fp32 graph (and the asked-for variants), check each; a failed check removes them all.

    ``strict=False`` (benchmarks on random weights only) records parity failures instead of raising.
    """
    out = Path(out)
    if out.suffix != ".onnx":
        raise ExportError(f"output must end in .onnx: {out}")
    if not out.parent.exists() or not os.access(out.parent, os.W_OK):
        raise ExportError(f"cannot write to {out.parent}: directory missing or not writable")
    if not 17 <= opset <= 21:
        raise ExportError(f"--opset {opset} is not supported: choose 17 to 21 (ONNX Runtime {_ort_version()} runs those)")
    model = model.float().eval()
    meta = graph_metadata(model, heads, source)
    variants = ["fp32"] + [v for v, on in (("opt", optimize), ("fp16", fp16), ("int8", int8), ("trt", trt)) if on]
    written: dict[str, Path] = {}
    reports, dropped = [], {}
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}.") as tmp_dir, quiet_third_party():
        tmp = Path(tmp_dir)
        # ORT-only variants start from the fused-attention graph (rotary models: from the plain one).
        fusable = model.cfg.position_embedding == "learned"
        if fusable and (optimize or int8):
            export_graph(model, tmp / "fused.onnx", opset, int32=False, fused_attention=True, heads=heads)
        for variant in variants:
            path = tmp / f"{variant}.onnx"
            write_variant(model, variant, path, tmp / ("fused.onnx" if fusable else "fp32.onnx"), opset, heads)
            _set_metadata(
                path,
                {
                    **meta,
                    "variant": variant,
                    "one_sequence_per_run": variant in ONE_SEQUENCE,
                    **({"inputs": {"tokens": "int32 [batch, length]"}} if variant == "trt" else {}),
                },  # fmt: skip
            )
            if variant not in ("opt", "int8"):  # ORT's contrib ops (MultiHeadAttention, ...) are not ONNX-standard
                check_graph(path)
            report = parity(model, path, variant, heads=heads)
            if report.failures and variant == "opt":
                dropped["opt"] = "; ".join(report.failures)  # keep the optimizer only if parity holds
                continue
            if report.failures and strict:
                raise ExportError(f"{variant} graph fails parity with PyTorch: {'; '.join(report.failures)}")
            reports.append(report)
            written[variant] = path
        trt_problems = trt_readiness(written["trt"]) if "trt" in written else []
        if trt_problems:
            raise ExportError("--trt graph is not TensorRT-ready: " + "; ".join(trt_problems))
        final = {}
        for variant, path in written.items():  # all checks passed: move into place
            final[variant] = _variant_path(out, variant)
            os.replace(path, final[variant])
    return ExportResult(final, reports, trt_problems, dropped)


def graph_metadata(model: ESM, heads: dict | None, source: dict[str, Any]) -> dict[str, Any]:
    """The contract, architecture, labels and heads (with calibration) every graph carries."""
    heads = heads or {}
    return {
        "esm_distill_contract": CONTRACT_VERSION,
        "inputs": {"tokens": "int64 [batch, length], ESM-1b alphabet, <cls> ... <eos>, right-padded with <pad>"},
        "outputs": output_names(heads),
        "alphabet": list(tokens.TOKENS),
        "architecture": model.cfg.to_dict(),
        "parameters": model.num_parameters(),
        "labels": {task: h.labels for task, h in heads.items()},
        "heads": {
            task: {
                "pooling": h.pooling,
                "hidden": h.card.get("hidden", 0),
                "metrics": h.card.get("metrics", {}),
                "calibration": h.card.get("calibration", {}),
            }  # fmt: skip
            for task, h in heads.items()
        },
        **source,
    }


def write_variant(model: ESM, variant: str, path: Path, ort_base: Path, opset: int, heads: dict | None) -> None:
    """One variant's graph: exported from PyTorch (fp32, trt) or derived by ONNX Runtime's tools (fp16, int8, opt)."""
    if variant == "fp32":
        export_graph(model, path, opset, int32=False, heads=heads)
    elif variant == "trt":
        export_graph(decompose_layer_norms(model), path, 17, int32=True, heads=heads)
    elif variant == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16  # ORT's tools: only when asked for

        onnx.save(convert_float_to_float16(onnx.load(str(path.with_name("fp32.onnx"))), keep_io_types=True), str(path))
    elif variant == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(ort_base), str(path), weight_type=QuantType.QInt8, nodes_to_quantize=encoder_matmuls(onnx.load(str(ort_base))))
    elif variant == "opt":
        from onnxruntime.transformers.optimizer import optimize_model

        opt = optimize_model(str(ort_base), model_type="bert", num_heads=model.cfg.heads, hidden_size=model.cfg.dim, opt_level=0)
        opt.save_model_to_file(str(path))


def _ort_version() -> str:
    return ort.__version__


def source_of(spec: str, card: dict[str, Any]) -> dict[str, Any]:
    """Provenance for the metadata: bundle (hash of its weights), random-init baseline or fair-esm model."""
    s = parse_spec(spec)
    preset = "fair-esm" if s.kind == "fair-esm" else card.get("preset") or "custom"
    return {"source": s.text, "source_sha256": (s.file_fingerprint() if s.kind != "random" else None) or "", "preset": preset}


def summary(result: ExportResult) -> str:
    """The parity table of every variant written (or dropped), and what TensorRT needs: what `distill export onnx` prints."""
    lines = [f"{'variant':8s} {'file':36s} {'MB':>7s}  {'max|d logits|':>13s} {'max|d emb|':>10s} {'min cos':>9s} {'top-1 masked':>12s} "
             f"{'head top-1':>10s} {'max|d p|':>9s} {'batch dep.':>10s}"]  # fmt: skip
    for r in result.reports:
        path, m = result.paths[r.variant], r.metrics
        head = (
            f"{m['min_head_top1_agreement']:10.1%} {m['max_abs_probabilities']:9.2e}"
            if "min_head_top1_agreement" in m
            else f"{'-':>10s} {'-':>9s}"
        )
        lines.append(f"{r.variant:8s} {str(path):36s} {path.stat().st_size / 1e6:7.2f}  {m['max_abs_logits']:13.2e} "
                     f"{m['max_abs_sequence_embedding']:10.2e} {m['min_cosine_sequence_embedding']:9.6f} {m['min_top1_masked']:12.1%} "
                     f"{head} {m['batch_max_abs']:10.1e}")  # fmt: skip
    lines += [f"{variant:8s} dropped: parity did not hold ({why})" for variant, why in result.dropped.items()]
    if "trt" in result.paths:
        lo, opt, hi = (f"tokens:{b}x{n}" for b, n in TRT_PROFILE.values())
        lines.append(f"TensorRT: {result.paths['trt']} is ready; build an engine with:\n  trtexec --onnx={result.paths['trt']} "
                     f"--minShapes={lo} --optShapes={opt} --maxShapes={hi} --fp16 --saveEngine={result.paths['trt'].with_suffix('.plan')}")  # fmt: skip
    else:
        problems = trt_readiness(result.paths["fp32"])
        lines.append(f"TensorRT: the fp32 graph is not TensorRT 8.5-ready ({'; '.join(problems)}); add --trt for a graph that is")
    return "\n".join(lines)


def export_command(
    model: str,
    output: Path,
    opset: int = 18,
    fp16: bool = False,
    int8: bool = False,
    optimize: bool = False,
    trt: bool = False,
    heads: bool | None = False,
) -> ExportResult:
    """`distill export onnx` (and `distill import`): any torch model spec -> checked graphs. ``heads``: True requires the
    bundle's heads, None takes them when there are any, False leaves them out."""
    enc = load_encoder(model)
    net, card = enc.model, enc.card
    found = None
    if heads is not False:
        found = (heads_of(Path(model), net.cfg.dim) if Path(model).is_dir() else {}) or None  # bundle or HF export
        if heads and not found:
            raise ExportError(
                f"{model} has no classification heads: add them with `distill probe {model} --task pfam ...`, or export without --heads"
            )
    return export(net, output, source_of(model, card), opset, fp16, int8, optimize, trt, heads=found)
