"""Tiny ESM checkpoints written in the exact layout of the published fair-esm files.

Built from fair-esm's own ``ProteinBertModel`` / ``ESM2`` with random weights (layer norms
included), so they exercise fair-esm's real loader and are independent of our module.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import esm
import torch


def _randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and "layer_norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _published_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fair-esm module names -> the published checkpoint's keys (contact head lives in its own file)."""
    return {
        ("encoder." if k.startswith("lm_head.") else "encoder.sentence_encoder.") + k: v.clone()
        for k, v in model.state_dict().items()
        if not k.startswith("contact_head.")
    }


def _write_regression(path: Path, n_attention_maps: int) -> None:
    regression = {
        "model": {"contact_head.regression.weight": 0.1 * torch.randn(1, n_attention_maps), "contact_head.regression.bias": torch.zeros(1)}
    }
    torch.save(regression, str(path.with_suffix("")) + "-contact-regression.pt")


def esm1b_args(layers: int, dim: int, heads: int, ffn: int) -> argparse.Namespace:
    # The fields fair-esm reads, named as in the published fairseq args (plus some it ignores).
    return argparse.Namespace(
        arch="roberta_large",
        encoder_layers=layers,
        encoder_embed_dim=dim,
        encoder_ffn_embed_dim=ffn,
        encoder_attention_heads=heads,
        max_positions=1024,
        token_dropout=True,
        dropout=0.1,
        attention_dropout=0.0,
        activation_dropout=0.0,
        mask_prob=0.15,
        leave_unmasked_prob=0.1,
        random_token_prob=0.1,
        criterion="masked_lm",
        task="masked_lm",
    )


def write_tiny_esm1b(path: Path, layers: int = 2, dim: int = 32, heads: int = 4, ffn: int = 64, seed: int = 0) -> Path:
    """``{name}.pt`` + ``{name}-contact-regression.pt`` as fair-esm publishes ESM-1b."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = esm1b_args(layers, dim, heads, ffn)
    alphabet = esm.Alphabet.from_architecture("ESM-1b")
    fair_args = argparse.Namespace(**{k.replace("encoder_", ""): v for k, v in vars(args).items()})
    fair_args.emb_layer_norm_before = True
    model = esm.model.esm1.ProteinBertModel(fair_args, alphabet)
    _randomise(model, seed)
    torch.save({"args": args, "model": _published_state(model)}, path)
    _write_regression(path, layers * heads)
    return path


def write_tiny_esm2(path: Path, layers: int = 2, dim: int = 32, heads: int = 4, seed: int = 0) -> Path:
    """ESM-2 layout: ``cfg["model"]`` with ``encoder_*`` fields and ``encoder.sentence_encoder.*`` keys."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    alphabet = esm.Alphabet.from_architecture("ESM-1b")
    model = esm.model.esm2.ESM2(num_layers=layers, embed_dim=dim, attention_heads=heads, alphabet=alphabet, token_dropout=True)
    _randomise(model, seed)
    cfg = {"model": argparse.Namespace(encoder_layers=layers, encoder_embed_dim=dim, encoder_attention_heads=heads, token_dropout=True)}
    torch.save({"cfg": cfg, "model": _published_state(model)}, path)
    _write_regression(path, layers * heads)
    return path
