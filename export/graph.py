"""The graph contract in PyTorch, and the rewrites that make it export well (see export/onnx.py for the contract).

``GraphModule`` maps tokens to the contract's outputs; ``decompose_layer_norms`` (TensorRT 8.5 has no
LayerNormalization) and ``FusedAttention`` (ONNX Runtime's contrib MultiHeadAttention) are applied to copies.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.core import tokens
from distill.core.errors import UserError
from distill.core.model import ESM, SelfAttention, sequence_embedding
from distill.inference.onnx_backend import OUTPUTS


@contextlib.contextmanager
def quiet_third_party():
    """Silence warnings our users cannot act on (torchvision ops not registered, ORT's quantisation hints)."""
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx._internal.exporter._registration")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class ExportError(UserError):
    """An export that cannot be made or fails a check; nothing is left behind."""


class GraphModule(nn.Module):
    """The graph contract in PyTorch: tokens -> (logits, residue_embeddings, sequence_embedding, *head probabilities)."""

    def __init__(self, model: ESM, heads: dict[str, Any] | None = None):
        super().__init__()
        self.model = model
        heads = heads or {}
        self.tasks = list(heads)
        self.poolings = [heads[t].pooling for t in self.tasks]
        self.heads = nn.ModuleList([heads[t].module for t in self.tasks])

    def forward(self, toks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        toks = toks.long()  # the --trt graph takes int32
        out = self.model(toks)
        reps = out["representations"]
        pooled = sequence_embedding(reps, toks)
        probs = [torch.softmax(h(pooled if p == "mean" else reps[:, 0]), -1) for h, p in zip(self.heads, self.poolings, strict=True)]
        return out["logits"], reps, pooled, *probs


def output_names(heads: dict[str, Any] | None) -> list[str]:
    return OUTPUTS + [f"{task}_probabilities" for task in heads or {}]


class DecomposedLayerNorm(nn.Module):
    """LayerNorm as primitive ops (ReduceMean, Sub, Pow, Sqrt, Div): TensorRT 8.5 has no LayerNormalization."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.weight, self.bias, self.eps = ln.weight, ln.bias, ln.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.eps) * self.weight + self.bias


def decompose_layer_norms(model: ESM) -> ESM:
    model = copy.deepcopy(model)
    for _, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(module, child_name, DecomposedLayerNorm(child))
    return model


# ---- fused attention for ONNX Runtime (the .opt and .int8 graphs) --------------------------------------
# PyTorch's SDPA exports as separate MatMul/Softmax/Transpose nodes; ONNX Runtime's transformer optimizer
# finds no attention pattern in them. So for the ONNX-Runtime-only variants, attention is exported as ORT's
# fused com.microsoft.MultiHeadAttention: a custom op whose PyTorch implementation is SDPA.


@torch.library.custom_op("esm_distill::mha", mutates_args=())
def _mha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, t, d = q.shape

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(b, t, num_heads, d // num_heads).transpose(1, 2)

    bias = (valid[:, None, None, :] == 0).to(q.dtype) * -1e4
    return F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias).transpose(1, 2).reshape(b, t, d)


@_mha.register_fake
def _(q, k, v, valid, num_heads):
    return torch.empty_like(q)


def _mha_translation():
    """onnxscript translation of esm_distill::mha to com.microsoft.MultiHeadAttention (schema declared here)."""
    import onnxscript  # only for the fused-attention variants

    param, optional = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.FormalParameterOption.Optional
    schema = onnx.defs.OpSchema(
        "MultiHeadAttention", "com.microsoft", 1,
        inputs=[param("query", "T"), param("key", "T"), param("value", "T"), param("bias", "T", param_option=optional),
                param("key_padding_mask", "M", param_option=optional)],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[onnx.defs.OpSchema.Attribute("num_heads", onnx.defs.OpSchema.AttrType.INT, "")],
    )  # fmt: skip
    mha = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MultiHeadAttention", schema)

    def translate(q, k, v, valid, num_heads: int):
        return mha(q, k, v, None, valid, num_heads=num_heads)

    return {torch.ops.esm_distill.mha.default: translate}


class FusedAttention(nn.Module):
    """Drop-in for SelfAttention at export time: same weights, attention through esm_distill::mha."""

    def __init__(self, attn: SelfAttention):
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        valid = (attn_mask[:, 0, 0, :] == 0).to(torch.int32)  # key-padding mask, 1 = real token
        a = self.attn
        return a.out_proj(torch.ops.esm_distill.mha(a.q_proj(x), a.k_proj(x), a.v_proj(x), valid, a.heads))


def _fuse_attention(model: ESM) -> ESM:
    model = copy.deepcopy(model)
    for layer in model.layers:
        layer.self_attn = FusedAttention(layer.self_attn)
    return model


def export_graph(model: ESM, path: Path, opset: int, int32: bool, fused_attention: bool = False, heads: dict | None = None) -> None:
    names = output_names(heads)
    example = torch.from_numpy(tokens.pad_batch([tokens.encode("MKTAYIAKQRQISFVKSHFSRQ"), tokens.encode("MKV")]))
    example = example.int() if int32 else example
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=model.cfg.max_positions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if opset == 17:
            # The dynamo exporter builds opset 18 and cannot down-convert; TorchScript's emits 17 natively.
            dims = {"tokens": {0: "batch", 1: "length"}, "logits": {0: "batch", 1: "length"},
                    "residue_embeddings": {0: "batch", 1: "length"}, "sequence_embedding": {0: "batch"},
                    **{n: {0: "batch"} for n in names[3:]}}  # fmt: skip
            torch.onnx.export(GraphModule(model, heads).eval(), (example,), str(path), dynamo=False, opset_version=17,
                              input_names=["tokens"], output_names=names, dynamic_axes=dims)  # fmt: skip
            return
        program = torch.onnx.export(
            GraphModule(_fuse_attention(model) if fused_attention else model, heads).eval(), (example,), dynamo=True,
            opset_version=opset, input_names=["tokens"], output_names=names, dynamic_shapes={"toks": {0: batch, 1: length}},
            verbose=False, custom_translation_table=_mha_translation() if fused_attention else None,
        )  # fmt: skip
    program.save(str(path), external_data=model.num_parameters() * 4 > 1.8e9)  # protobuf's 2 GB limit
