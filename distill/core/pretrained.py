"""fair-esm checkpoints in and out: published ESM models become our ``ESM`` module, and any
student can be written back as a fair-esm ``.pt`` that ``esm.pretrained`` opens.

Loading goes through fair-esm's own ``esm.pretrained`` code (hub names download into the torch
hub cache when online). fair-esm 2.0.0 calls ``torch.load`` without ``weights_only``; torch >= 2.6
then defaults to ``weights_only=True`` and refuses every published checkpoint because they pickle
an ``argparse.Namespace``. We allow exactly that one class instead of switching the check off.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import esm
import torch

from distill.core.config import ModelConfig
from distill.core.errors import UserError
from distill.core.io import atomic_torch_save
from distill.core.model import ESM

_MODEL_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt"
_REGRESSION_URL = "https://dl.fbaipublicfiles.com/fair-esm/regression/{name}-contact-regression.pt"


class ModelNotAvailable(UserError):
    """A fair-esm model that is neither cached nor downloadable here."""


def _offline_message(name: str, cause: BaseException) -> str:
    ckpt = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"Cannot load fair-esm model {name!r}: it is not in the torch hub cache and downloading it "
        f"failed ({type(cause).__name__}: {cause}).\n"
        f"On a machine with internet access, download\n"
        f"  {_MODEL_URL.format(name=name)}\n"
        f"  {_REGRESSION_URL.format(name=name)}\n"
        f"then either put both files into {ckpt}/ (the torch hub cache; set TORCH_HOME to move it),\n"
        f"or keep them side by side anywhere and pass the path where the name went: --teacher /path/to/{name}.pt\n"
        f'(a model spec of any other command takes the same path; in a sweep config, teacher = "/path/to/{name}.pt")'
    )


def load_fair_esm(spec: str) -> torch.nn.Module:
    """fair-esm's own model object for a hub name or a local ``.pt`` (with its regression file)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        if spec.endswith(".pt"):
            path = Path(spec)
            if not path.is_file():
                raise FileNotFoundError(f"teacher checkpoint {path} does not exist")
            regression = Path(str(path.with_suffix("")) + "-contact-regression.pt")
            if "esm1v" not in path.stem and not regression.is_file():
                raise FileNotFoundError(
                    f"{path} needs its companion {regression.name} beside it (fair-esm's layout); it holds the contact-regression weights"
                )
            try:
                model, _ = esm.pretrained.load_model_and_alphabet_local(str(path))
            except Exception as e:  # unpickling, truncation, missing keys: all "not a checkpoint" to the user
                raise ValueError(f"{path} is not a readable fair-esm checkpoint ({type(e).__name__}: {e})") from e
            return model
        if not hasattr(esm.pretrained, spec):
            raise ValueError(f"{spec!r} is neither a fair-esm model name nor a path to a .pt checkpoint")
        try:
            model, _ = esm.pretrained.load_model_and_alphabet_hub(spec)
        except Exception as e:  # fair-esm raises bare Exception / URLError / RuntimeError offline
            raise ModelNotAvailable(_offline_message(spec, e)) from e
        return model


def config_from_fair_esm(fair: torch.nn.Module) -> ModelConfig:
    if isinstance(fair, esm.model.esm2.ESM2):
        return ModelConfig(
            layers=fair.num_layers,
            dim=fair.embed_dim,
            heads=fair.attention_heads,
            ffn=4 * fair.embed_dim,
            token_dropout=fair.token_dropout,
            emb_layer_norm_before=False,
            position_embedding="rotary",
        )
    if isinstance(fair, esm.model.esm1.ProteinBertModel) and fair.model_version == "ESM-1b":
        a = fair.args
        return ModelConfig(
            layers=a.layers,
            dim=a.embed_dim,
            heads=a.attention_heads,
            ffn=a.ffn_embed_dim,
            max_positions=a.max_positions,
            token_dropout=bool(getattr(a, "token_dropout", False)),
            emb_layer_norm_before=fair.emb_layer_norm_before is not None,
        )
    raise ValueError(
        f"{type(fair).__name__} ({getattr(fair, 'model_version', '?')}) is not supported: "
        "esm-distill runs ESM-1b-architecture (roberta_large, incl. ESM-1v) and ESM-2 models"
    )


def from_fair_esm(fair: torch.nn.Module) -> ESM:
    """Copy a fair-esm model's weights into our module (same parameter names)."""
    model = ESM(config_from_fair_esm(fair))
    state = {k: v for k, v in fair.state_dict().items() if not k.startswith("contact_head.")}
    model.load_state_dict(state, strict=True)
    return model


def load_pretrained(spec: str) -> ESM:
    return from_fair_esm(load_fair_esm(spec))


def save_fair_esm(model: ESM, path: Path) -> tuple[Path, Path]:
    """Write ``model`` as a fair-esm ESM-1b-format checkpoint plus its ``-contact-regression.pt``.

    The layout is that of the published files: ``{"args": Namespace(arch="roberta_large",
    encoder_*...), "model": {"encoder.sentence_encoder.*", "encoder.lm_head.*"}}``. The contact
    regression is zero (students have no trained contact head); fair-esm requires the file.
    """
    cfg = model.cfg
    if cfg.position_embedding != "learned":
        raise ValueError("only learned-position (ESM-1b-architecture) models export to fair-esm's ESM-1b format")
    path = Path(path)
    if path.suffix != ".pt":
        raise ValueError(f"fair-esm checkpoints end in .pt (fair-esm treats the name that way): {path}")
    args = argparse.Namespace(
        arch="roberta_large",
        encoder_layers=cfg.layers,
        encoder_embed_dim=cfg.dim,
        encoder_ffn_embed_dim=cfg.ffn,
        encoder_attention_heads=cfg.heads,
        max_positions=cfg.max_positions,
        token_dropout=cfg.token_dropout,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    state = {}
    for k, v in model.state_dict().items():
        prefix = "encoder." if k.startswith("lm_head.") else "encoder.sentence_encoder."
        state[prefix + k] = v.detach().clone().cpu()
    regression = {
        "model": {
            "contact_head.regression.weight": torch.zeros(1, cfg.layers * cfg.heads),
            "contact_head.regression.bias": torch.zeros(1),
        }
    }
    regression_path = Path(str(path.with_suffix("")) + "-contact-regression.pt")
    atomic_torch_save({"args": args, "model": state}, path)
    atomic_torch_save(regression, regression_path)
    return path, regression_path
