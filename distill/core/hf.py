"""Hugging Face `transformers` ESM checkpoints in (wherever a fair-esm model goes) and students out (`distill export hf`).

An ``EsmForMaskedLM`` directory (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``) maps one to one
onto our ESM class: ESM-1b layout (absolute positions, layer norm before the stack, token dropout) or ESM-2
layout (rotary). Reading needs neither ``transformers`` nor network: the config is JSON and the weights are
safetensors (or a torch pickle). A hub id (``facebook/esm1b_t33_650M_UR50S``) is looked up in the local HF cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from distill.core import tokens
from distill.core.config import ModelConfig
from distill.core.errors import UserError
from distill.core.hf_card import model_card
from distill.core.io import read_json_object
from distill.core.model import ESM
from distill.core.spec import HUB_ID, is_hf_dir

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# ours -> transformers', per layer (``{i}``) and for the rest
LAYER_KEYS = {
    "self_attn.q_proj": "attention.self.query", "self_attn.k_proj": "attention.self.key", "self_attn.v_proj": "attention.self.value",
    "self_attn.out_proj": "attention.output.dense", "self_attn_layer_norm": "attention.LayerNorm",
    "fc1": "intermediate.dense", "fc2": "output.dense", "final_layer_norm": "LayerNorm",
}  # fmt: skip
TOP_KEYS = {
    "embed_tokens.weight": "esm.embeddings.word_embeddings.weight", "embed_positions.weight": "esm.embeddings.position_embeddings.weight",
    "emb_layer_norm_before.weight": "esm.embeddings.layer_norm.weight", "emb_layer_norm_before.bias": "esm.embeddings.layer_norm.bias",
    "emb_layer_norm_after.weight": "esm.encoder.emb_layer_norm_after.weight", "emb_layer_norm_after.bias": "esm.encoder.emb_layer_norm_after.bias",
    "lm_head.weight": "lm_head.decoder.weight", "lm_head.bias": "lm_head.bias",
    "lm_head.dense.weight": "lm_head.dense.weight", "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layer_norm.weight": "lm_head.layer_norm.weight", "lm_head.layer_norm.bias": "lm_head.layer_norm.bias",
}  # fmt: skip


class HFError(UserError):
    """An HF directory that is not a usable ESM checkpoint, or one that is not here; the message says which and why."""


def hf_key(ours: str) -> str:
    m = re.match(r"layers\.(\d+)\.(.+)\.(weight|bias)$", ours)
    if m:
        return f"esm.encoder.layer.{m.group(1)}.{LAYER_KEYS[m.group(2)]}.{m.group(3)}"
    return TOP_KEYS[ours]


def find(spec: str) -> Path | None:
    """A local HF directory, or a hub id's snapshot in the local HF cache (HF_HOME); None when neither."""
    if Path(spec).is_dir():
        return Path(spec) if is_hf_dir(Path(spec)) else None
    if not HUB_ID.match(spec):
        return None
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    snapshots = sorted((hub / f"models--{spec.replace('/', '--')}" / "snapshots").glob("*/config.json"))
    if not snapshots:
        raise HFError(
            f"{spec!r} is not in the local Hugging Face cache ({hub}) and this machine cannot download it. On a machine with "
            f"network: `huggingface-cli download {spec} config.json model.safetensors vocab.txt` (or the .bin), then copy "
            f"the cache to {hub} (HF_HOME moves it), or pass the downloaded directory itself as the model."
        )
    return snapshots[-1].parent


def config_of(hf: dict[str, Any], where: Path) -> ModelConfig:
    """Our ModelConfig for an ``EsmConfig``; layouts and vocabularies we cannot run are refused by name."""
    if hf.get("model_type") != "esm":
        raise HFError(f"{where}/config.json is a {hf.get('model_type')!r} model, not ESM (model_type 'esm', EsmForMaskedLM)")
    if hf.get("vocab_size") != tokens.VOCAB_SIZE or hf.get("pad_token_id", 1) != tokens.PAD or hf.get("mask_token_id", 32) != tokens.MASK:
        raise HFError(f"{where}: vocabulary {hf.get('vocab_size')} tokens (pad {hf.get('pad_token_id')}, mask {hf.get('mask_token_id')}); "
                      f"esm-distill runs the 33-token ESM alphabet (pad {tokens.PAD}, mask {tokens.MASK})")  # fmt: skip
    if abs(hf.get("layer_norm_eps", 1e-12) - 1e-5) > 1e-9:
        raise HFError(f"{where}: layer_norm_eps {hf.get('layer_norm_eps', 1e-12)}; ESM checkpoints (and esm-distill) use 1e-5")
    kind = hf.get("position_embedding_type", "absolute")
    if kind not in ("absolute", "rotary"):
        raise HFError(f"{where}: position_embedding_type {kind!r} is not supported (absolute: ESM-1b, rotary: ESM-2)")
    max_positions = hf.get("max_position_embeddings", 1026) - tokens.PAD - 1
    if kind == "absolute" and max_positions != 1024:
        raise HFError(f"{where}: {hf.get('max_position_embeddings')} position embeddings; ESM-1b's layout has 1026 (1,024 positions)")
    return ModelConfig(
        layers=hf["num_hidden_layers"], dim=hf["hidden_size"], heads=hf["num_attention_heads"], ffn=hf["intermediate_size"],
        token_dropout=bool(hf.get("token_dropout", False)), emb_layer_norm_before=bool(hf.get("emb_layer_norm_before", False)),
        position_embedding="learned" if kind == "absolute" else "rotary",
    )  # fmt: skip


def _get(state: dict[str, torch.Tensor], key: str) -> torch.Tensor | None:
    """A weight by its transformers name; LayerNorm weights may be saved under the legacy gamma / beta names."""
    if key in state:
        return state[key]
    legacy = re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", key))
    return state.get(legacy)


def load_hf(directory: Path) -> tuple[ESM, dict[str, Any]]:
    """An ``EsmForMaskedLM`` directory -> (our model in eval mode, card)."""
    directory = Path(directory)
    cfg = config_of(read_json_object(directory / "config.json", "HF config"), directory)
    weights = next((directory / f for f in WEIGHT_FILES if (directory / f).is_file()), None)
    if weights is None:
        raise HFError(f"{directory} has a config.json but no weights ({' or '.join(WEIGHT_FILES)})")
    try:
        state = load_file(str(weights)) if weights.suffix == ".safetensors" else torch.load(weights, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError) as e:
        raise HFError(f"{weights} is corrupt or truncated: {e}") from e
    model = ESM(cfg)
    ours = [k for k in model.state_dict() if "rot_emb" not in k]
    state.setdefault("lm_head.decoder.weight", state.get("esm.embeddings.word_embeddings.weight"))  # tied when absent
    missing = [hf_key(k) for k in ours if _get(state, hf_key(k)) is None]
    if missing:
        raise HFError(f"{weights} lacks {len(missing)} ESM weights (first: {missing[0]}); is it an EsmForMaskedLM checkpoint?")
    loaded = {k: _get(state, hf_key(k)) for k in ours}
    try:
        model.load_state_dict(loaded, strict=False)
    except RuntimeError as e:
        raise HFError(f"{weights} does not match its config.json ({cfg.layers} layers, dim {cfg.dim}): {e}") from e
    card = {"name": str(directory), "model": cfg.to_dict(), "parameters": model.num_parameters(), "preset": None, "source": "huggingface"}
    return model.eval(), card


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["EsmForMaskedLM"], "model_type": "esm", "vocab_size": tokens.VOCAB_SIZE, "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads, "intermediate_size": cfg.ffn, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "layer_norm_eps": 1e-5, "initializer_range": 0.02,
        "max_position_embeddings": cfg.max_positions + tokens.PAD + 1,
        "position_embedding_type": "absolute" if cfg.position_embedding == "learned" else "rotary",
        "emb_layer_norm_before": cfg.emb_layer_norm_before, "token_dropout": cfg.token_dropout, "pad_token_id": tokens.PAD,
        "mask_token_id": tokens.MASK, "is_folding_model": False, "tie_word_embeddings": True, "torch_dtype": "float32",
    }  # fmt: skip


def write_tokenizer(directory: Path) -> None:
    """``EsmTokenizer`` files: the vocabulary is ours, in id order."""
    (directory / "vocab.txt").write_text("".join(t + "\n" for t in tokens.TOKENS))
    specials = {"cls_token": "<cls>", "pad_token": "<pad>", "eos_token": "<eos>", "unk_token": "<unk>", "mask_token": "<mask>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "EsmTokenizer", "model_max_length": 1024, **specials}, indent=2)
    )


def export_hf(model: ESM, card: dict[str, Any], out: Path, heads: Path | None = None) -> Path:
    """A directory `transformers.AutoModelForMaskedLM` / `AutoTokenizer.from_pretrained` load offline, with a model card."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another -o")
    out.mkdir(parents=True, exist_ok=True)
    state = {hf_key(k): v.detach().contiguous().clone() for k, v in model.state_dict().items() if "rot_emb" not in k}
    # EsmForMaskedLM carries a contact-prediction head; students have none: zeros, so that loading reports nothing missing
    state["esm.contact_head.regression.weight"] = torch.zeros(1, model.cfg.layers * model.cfg.heads)
    state["esm.contact_head.regression.bias"] = torch.zeros(1)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(model.cfg), indent=2))
    write_tokenizer(out)
    if heads is not None and heads.is_dir():
        shutil.copytree(heads, out / "heads")
    (out / "README.md").write_text(model_card(model, card, out))
    return out
