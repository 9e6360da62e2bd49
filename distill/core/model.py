"""The ESM-1b architecture at any size: every student, and (with fair-esm weights) the teacher.

Parameter names follow fair-esm's ``ProteinBertModel`` one to one (``embed_tokens``,
``layers.N.self_attn.q_proj``, ``emb_layer_norm_after``, ``lm_head.dense`` ...), so a published
checkpoint loads with a plain ``load_state_dict`` and a student exports back to fair-esm's format.
The details that make it *exactly* ESM-1b:

- token dropout: ``<mask>`` embeddings are zeroed and the rest rescaled by
  ``(1 - 0.15*0.8) / (1 - observed mask ratio)`` -- always, also at inference, as fair-esm does;
- learned positions count from ``padding_idx + 1`` over non-pad tokens (so right padding never
  shifts a real position), up to 1024 positions;
- optional layer norm before the stack (ESM-1b has it), always one after it;
- pre-LayerNorm blocks with erf-GELU, attention through SDPA with a key-padding mask;
- an LM head (dense -> GELU -> LayerNorm -> tied token embedding + bias).

``position_embedding="rotary"`` (and no learned positions) gives the ESM-2 variant.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.core import tokens
from distill.core.config import ModelConfig


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)  # exact erf form, as fair-esm's gelu


class LearnedPositionalEmbedding(nn.Embedding):
    """Positions padding_idx+1, padding_idx+2, ... for real tokens; padding_idx for pads."""

    def __init__(self, max_positions: int, dim: int, padding_idx: int):
        super().__init__(max_positions + padding_idx + 1, dim, padding_idx)
        self.max_positions = max_positions

    def forward(self, toks: torch.Tensor) -> torch.Tensor:
        mask = toks.ne(self.padding_idx).long()
        positions = torch.cumsum(mask, dim=1) * mask + self.padding_idx
        return F.embedding(positions, self.weight, self.padding_idx)


class RotaryEmbedding(nn.Module):
    """ESM-2's rotary embedding (RoFormer), applied to queries and keys."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(q.shape[-2], device=q.device, dtype=self.inv_freq.dtype)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)

        def rotate(x: torch.Tensor) -> torch.Tensor:
            x1, x2 = x.chunk(2, dim=-1)
            return x * cos + torch.cat((-x2, x1), dim=-1) * sin

        return rotate(q), rotate(k)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, rotary: bool):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.rot_emb = RotaryEmbedding(dim // heads) if rotary else None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, d // self.heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.rot_emb is not None:
            q, k = self.rot_emb(q, k)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype))
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class TransformerLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(LN(x)), then x + fc2(gelu(fc1(LN(x))))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg.dim, cfg.heads, rotary=cfg.position_embedding == "rotary")
        self.self_attn_layer_norm = nn.LayerNorm(cfg.dim)
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn)
        self.fc2 = nn.Linear(cfg.ffn, cfg.dim)
        self.final_layer_norm = nn.LayerNorm(cfg.dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), attn_mask)
        return x + self.fc2(gelu(self.fc1(self.final_layer_norm(x))))


class LMHead(nn.Module):
    def __init__(self, dim: int, weight: nn.Parameter):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.layer_norm = nn.LayerNorm(dim)
        self.weight = weight  # tied to the token embedding
        self.bias = nn.Parameter(torch.zeros(weight.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.layer_norm(gelu(self.dense(x))), self.weight) + self.bias


class ESM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=cfg.padding_idx)
        self.embed_positions = (
            LearnedPositionalEmbedding(cfg.max_positions, cfg.dim, cfg.padding_idx) if cfg.position_embedding == "learned" else None
        )
        self.emb_layer_norm_before = nn.LayerNorm(cfg.dim) if cfg.emb_layer_norm_before else None
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.layers))
        self.emb_layer_norm_after = nn.LayerNorm(cfg.dim)
        self.lm_head = LMHead(cfg.dim, self.embed_tokens.weight)
        self.apply(self._init_weights)
        if cfg.token_dropout:
            # fair-esm zeroes the <mask> row on load "for token drop"; keep it zero for good
            # (its gradient is dropped), so a student round-trips through fair-esm's loader exactly.
            with torch.no_grad():
                self.embed_tokens.weight[cfg.mask_idx].zero_()
            self.embed_tokens.weight.register_hook(self._drop_mask_row_grad)

    def _drop_mask_row_grad(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[self.cfg.mask_idx] = 0
        return grad

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # BERT-style initialisation for training students from scratch.
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the tied LM head weight counts once

    def forward(self, toks: torch.Tensor) -> dict[str, torch.Tensor]:
        """toks [batch, length] -> logits [batch, length, vocab], representations [batch, length, dim].

        ``representations`` is the last layer after the final layer norm (fair-esm's
        ``representations[num_layers]``).
        """
        cfg = self.cfg
        if not torch.compiler.is_compiling() and toks.shape[1] > cfg.max_positions and self.embed_positions is not None:
            raise ValueError(f"{toks.shape[1]} tokens exceed the model's {cfg.max_positions} positions")
        padding_mask = toks.eq(cfg.padding_idx)
        x = self.embed_tokens(toks)
        if cfg.token_dropout:
            is_mask = toks.eq(cfg.mask_idx)
            x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
            mask_ratio_train = 0.15 * 0.8
            mask_ratio_observed = is_mask.sum(-1).to(x.dtype) / (~padding_mask).sum(-1)
            x = x * (1 - mask_ratio_train) / (1 - mask_ratio_observed)[:, None, None]
        if self.embed_positions is not None:
            x = x + self.embed_positions(toks)
        if self.emb_layer_norm_before is not None:
            x = self.emb_layer_norm_before(x)
        x = x * (~padding_mask).unsqueeze(-1).to(x.dtype)

        # Additive key-padding bias, [batch, 1, 1, length]: -1e4 on pad keys (exp underflows to exactly 0,
        # and it is finite in fp16/bf16). Additive rather than boolean because a boolean mask exports to ONNX
        # as a -inf fill plus a NaN scrub over the whole [batch, heads, L, L] score tensor (a third of ONNX
        # Runtime's time). Always passed, with no "any padding?" branch: one graph for every batch.
        attn_mask = padding_mask[:, None, None, :].to(x.dtype) * -1e4
        for layer in self.layers:
            x = layer(x, attn_mask)
        x = self.emb_layer_norm_after(x)
        return {"logits": self.lm_head(x), "representations": x}


def sequence_embedding(representations: torch.Tensor, toks: torch.Tensor) -> torch.Tensor:
    """[batch, length, dim] -> [batch, dim]: mean over real residues only (no BOS, EOS or padding).

    The one definition of a protein's embedding, shared by PyTorch code and the ONNX graph.
    """
    real = toks.ne(tokens.PAD) & toks.ne(tokens.CLS) & toks.ne(tokens.EOS)
    weight = real.unsqueeze(-1).to(representations.dtype)
    return (representations * weight).sum(1) / weight.sum(1).clamp_min(1.0)


def pooled_embedding(out: dict[str, torch.Tensor], toks: torch.Tensor) -> torch.Tensor:
    """A model's protein embedding: its own pooling where it defines one (UniRep's h_avg), else ``sequence_embedding``."""
    return out["pooled"] if "pooled" in out else sequence_embedding(out["representations"], toks)


def build_student(cfg: ModelConfig, seed: int | None = None) -> ESM:
    if seed is not None:
        torch.manual_seed(seed)
    return ESM(cfg)


def weights_sha256(model: torch.nn.Module) -> str:
    """The one weight fingerprint: sha256 over parameter names and fp32 values (so a bf16 copy of a model hashes
    like the model); teacher caches, heads, indexes and fine-tuned bundles record it."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
