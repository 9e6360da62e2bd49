import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import EXAMPLES, shared
from typer.testing import CliRunner

from distill.cli.app import app
from distill.core import tokens
from distill.core.bundle import save_bundle
from distill.core.config import ModelConfig
from distill.core.fasta import read_fasta
from distill.core.io import sha256_file
from distill.core.model import ESM, sequence_embedding
from distill.core.pretrained import load_pretrained
from distill.inference import SequenceError, resolve
from distill.inference.onnx_backend import select_providers
from export import onnx as ox
from export import parity as px

runner = CliRunner()
TEACHER = EXAMPLES / "teacher" / "tiny_esm1b_t4_192.pt"  # trained weights: int8 top-1 agreement is meaningful


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The bundled (trained) tiny ESM-1b-architecture model, exported with every variant via the CLI."""
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    res = runner.invoke(app, ["export", "onnx", str(TEACHER), "-o", str(out), "--fp16", "--int8", "--optimize", "--trt"])
    assert res.exit_code == 0, res.output
    return out, res.output


@pytest.fixture(scope="module")
def student_bundle(tmp_path_factory):
    torch.manual_seed(0)
    return save_bundle(tmp_path_factory.mktemp("b") / "student", ESM(ModelConfig(layers=2, dim=32, heads=4, ffn=64)), "custom")


def test_every_variant_is_written_checked_and_reported(exported):
    out, report = exported
    for variant in ("fp32", "opt", "fp16", "int8", "trt"):
        path = out if variant == "fp32" else out.with_name(f"tiny.{variant}.onnx")
        assert path.is_file(), variant
        assert path.name in report
    assert "trtexec --onnx=" in report and "--minShapes=tokens:1x3 --optShapes=tokens:32x256 --maxShapes=tokens:64x1024" in report
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_parity_on_real_scope_sequences_meets_the_contract(exported):
    out, _ = exported
    model = load_pretrained(str(TEACHER))
    records = sorted(read_fasta(shared("scope/astral-scopedom-40-2.07.shared85.fa")), key=lambda r: len(r.sequence))
    seqs = [records[int(q * (len(records) - 1))].sequence[:1022] for q in (0.02, 0.2, 0.5, 0.8, 0.97, 1.0)]
    fp32 = px.parity(model, out, "fp32", seqs).metrics
    assert fp32["max_abs_logits"] <= 1e-4 and fp32["max_abs_sequence_embedding"] <= 1e-4
    fp16 = px.parity(model, out.with_name("tiny.fp16.onnx"), "fp16", seqs).metrics
    assert fp16["min_cosine_sequence_embedding"] >= 0.999
    int8 = px.parity(model, out.with_name("tiny.int8.onnx"), "int8", seqs).metrics
    assert int8["min_cosine_sequence_embedding"] >= 0.99 and int8["batch_max_abs"] == 0.0
    trt = px.parity(model, out.with_name("tiny.trt.onnx"), "trt", seqs).metrics
    assert trt["max_abs_logits"] <= 1e-4


def test_metadata_round_trip(exported):
    out, _ = exported
    meta = ox.read_metadata(out)
    assert meta["esm_distill_contract"] == 1 and meta["variant"] == "fp32"
    assert meta["alphabet"] == list(tokens.TOKENS) and meta["outputs"] == ox.OUTPUTS
    assert meta["architecture"]["layers"] == 4 and meta["architecture"]["dim"] == 192
    assert meta["parameters"] == load_pretrained(str(TEACHER)).num_parameters()
    assert meta["source_sha256"] == sha256_file(TEACHER) and meta["preset"] == "fair-esm" and meta["labels"] == {}
    assert ox.read_metadata(out.with_name("tiny.trt.onnx"))["inputs"]["tokens"].startswith("int32")


def test_graph_contract_shapes_and_types(exported):
    out, _ = exported
    g = onnx.load(str(out)).graph
    shape = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert (g.input[0].name, shape(g.input[0]), g.input[0].type.tensor_type.elem_type) == (
        "tokens",
        ["batch", "length"],
        onnx.TensorProto.INT64,
    )
    assert [(o.name, shape(o)) for o in g.output] == [
        ("logits", ["batch", "length", 33]),
        ("residue_embeddings", ["batch", "length", 192]),
        ("sequence_embedding", ["batch", 192]),
    ]
    t = onnx.load(str(out.with_name("tiny.trt.onnx"))).graph.input[0]
    assert t.type.tensor_type.elem_type == onnx.TensorProto.INT32


def test_tensorrt_readiness_is_checked_against_the_parser_list(exported):
    out, _ = exported
    assert ox.trt_readiness(out.with_name("tiny.trt.onnx")) == []
    problems = ox.trt_readiness(out)
    assert any("LayerNormalization" in p for p in problems) and any("opset 18 > 17" in p for p in problems)
    assert any("int64" in p for p in problems)


def test_embedder_padding_invariance_order_and_pytorch_definition(exported):
    out, _ = exported
    seqs = [r.sequence for r in read_fasta(EXAMPLES / "valid.fasta")][:12]
    embedder = resolve(out, providers="cpu", max_tokens=600)
    together = embedder.embed(seqs, per_residue=True)
    model = load_pretrained(str(TEACHER)).eval()
    for seq, e in zip(seqs, together, strict=True):
        alone = embedder.embed([seq], per_residue=True)[0]
        np.testing.assert_allclose(e.sequence, alone.sequence, atol=1e-5)
        assert e.residues.shape == (len(seq), 192)
        toks = torch.from_numpy(tokens.pad_batch([tokens.encode(seq)]))
        with torch.no_grad():
            ref = sequence_embedding(model(toks)["representations"], toks)[0].numpy()
        np.testing.assert_allclose(e.sequence, ref, atol=1e-4)
    assert embedder.provider == "CPUExecutionProvider"


def test_embedder_rejects_bad_sequences_by_index(exported):
    embedder = resolve(exported[0], providers="cpu")
    with pytest.raises(SequenceError, match="sequence 2: illegal residue 'J' at position 3"):
        embedder.embed(["MKV", "MKJL"])
    with pytest.raises(SequenceError, match="sequence 1: empty sequence"):
        embedder.embed([""])
    with pytest.raises(SequenceError, match="1100 residues exceed the limit of 1022"):
        embedder.embed(["M" * 1100])
    e = embedder.embed(["M" * 1100], long="crop")[0]
    assert e.cropped and e.sequence.shape == (192,)


def test_provider_selection():
    assert select_providers("auto")[-1] == "CPUExecutionProvider"
    with pytest.raises(ValueError, match="esm-distill\\[gpu\\]"):
        select_providers("cuda")


def test_student_bundle_and_esm2_export(student_bundle, tiny_esm2, tmp_path):
    res = runner.invoke(app, ["export", "onnx", str(student_bundle), "-o", str(tmp_path / "s.onnx")])
    assert res.exit_code == 0, res.output
    assert ox.read_metadata(tmp_path / "s.onnx")["preset"] == "custom"
    assert "not TensorRT 8.5-ready" in res.output
    res = runner.invoke(app, ["export", "onnx", str(tiny_esm2), "-o", str(tmp_path / "e2.onnx")])
    assert res.exit_code == 0, res.output  # rotary positions export too


@pytest.mark.parametrize(
    "args, message",
    [
        (["no/such/bundle"], "neither a student bundle"),
        (["{empty}"], "config.json is missing"),
        (["{bundle}", "--opset", "16"], "--opset 16 is not supported"),
        (["{bundle}", "--heads"], "no classification heads"),
        (["{bundle}", "-o", "/nonexistent/dir/x.onnx"], "cannot write to /nonexistent/dir"),
        (["{bundle}", "-o", "{tmp}/x.txt"], "output must end in .onnx"),
    ],
)
def test_bad_exports_are_clear_errors(args, message, student_bundle, tmp_path):
    (tmp_path / "empty").mkdir()
    args = [a.format(empty=tmp_path / "empty", bundle=student_bundle, tmp=tmp_path) for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "x.onnx")]
    res = runner.invoke(app, ["export", "onnx", *args])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not list(tmp_path.glob("*.onnx"))


def test_failed_check_leaves_nothing_behind(student_bundle, tmp_path, monkeypatch):
    monkeypatch.setitem(px.THRESHOLDS, "int8", {"min_cosine_sequence_embedding": 1.01})
    res = runner.invoke(app, ["export", "onnx", str(student_bundle), "-o", str(tmp_path / "x.onnx"), "--int8"])
    assert res.exit_code == 2 and "int8 graph fails parity" in res.output
    assert list(tmp_path.iterdir()) == []


def test_corrupt_bundle(student_bundle, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(student_bundle, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 10)
    res = runner.invoke(app, ["export", "onnx", str(broken), "-o", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and "corrupt or truncated" in res.output
    card = json.loads((student_bundle / "config.json").read_text())
    assert card["format"] == "esm-distill-bundle"


def test_onnx_runtime_variants_use_fused_attention_and_standard_graphs_do_not(exported):
    out, _ = exported
    ops = {
        v: {n.op_type for n in onnx.load(str(out.with_name(f"tiny.{v}.onnx") if v != "fp32" else out)).graph.node}
        for v in ("fp32", "opt", "int8", "trt")
    }
    assert "MultiHeadAttention" in ops["opt"] and "MultiHeadAttention" in ops["int8"]
    assert "MultiHeadAttention" not in ops["fp32"] and "MultiHeadAttention" not in ops["trt"]


def test_int8_answers_do_not_depend_on_the_batch_and_the_gate_reports_it(exported):
    """Dynamic int8 scales activations per tensor: run on a padded batch a sequence's embedding moves with its
    companions; the graph says so in its metadata and the inference layer runs it one sequence per pass."""
    out, report = exported
    int8 = out.with_name("tiny.int8.onnx")
    assert ox.read_metadata(int8)["one_sequence_per_run"] is True and ox.read_metadata(out)["one_sequence_per_run"] is False
    seqs = [r.sequence for r in read_fasta(EXAMPLES / "valid.fasta")][:10]
    batch = tokens.pad_batch([tokens.encode(s) for s in seqs])
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    raw_alone = session.run(["sequence_embedding"], {"tokens": batch[:1, : len(seqs[0]) + 2]})[0][0]
    raw_batched = session.run(["sequence_embedding"], {"tokens": batch})[0][0]
    assert np.abs(raw_alone - raw_batched).max() > 1e-4  # the graph itself is batch-dependent: why the policy exists
    model = resolve(int8, providers="cpu")
    together, shuffled = model.embed(seqs), model.embed(seqs[::-1])[::-1]
    for s, a, b in zip(seqs, together, shuffled, strict=True):
        alone = model.embed([s])[0]
        np.testing.assert_array_equal(a.sequence, alone.sequence)
        np.testing.assert_array_equal(b.sequence, alone.sequence)
    parity = px.parity(load_pretrained(str(TEACHER)), int8, "int8")
    assert parity.metrics["batch_max_abs"] == 0.0 and not parity.failures
    assert "batch dep." in report
