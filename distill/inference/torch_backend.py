"""PyTorch backend: a student bundle, a fair-esm model (ESM-1b) or a random-init model, with heads.

CUDA (bf16 autocast) when available, else CPU. ``heads`` maps task -> ``distill.core.heads.Head``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from distill.core.distributed import pick_device
from distill.core.heads import Head
from distill.core.model import ESM, pooled_embedding
from distill.inference.layer import Outputs


class TorchBackend:
    max_tokens = None
    max_rows = None

    def __init__(
        self, model: ESM, heads: dict[str, Head] | None = None, name: str = "", metadata: dict | None = None, device: str = "auto"
    ):
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.heads = heads or {}
        self.name = name
        self.dim = model.cfg.dim
        self.labels = {t: h.labels for t, h in self.heads.items()}
        self.thresholds = {t: h.min_probability for t, h in self.heads.items()}
        self.calibrations = {t: h.card.get("calibration", {}) for t, h in self.heads.items()}
        self.metadata: dict[str, Any] = {"architecture": model.cfg.to_dict(), "parameters": model.num_parameters(), **(metadata or {})}

    @property
    def provider(self) -> str:
        return f"torch-{self.device.type}"

    def forward(self, batch: np.ndarray, sequences: list[str], tasks: list[str], residues: bool, cls: bool) -> Outputs:
        toks = torch.from_numpy(batch).to(self.device)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.model(toks)
        reps = out["representations"].float()
        pooled = pooled_embedding(out, toks).float().cpu().numpy()
        first = reps[:, 0].cpu().numpy()
        probs = {t: self.heads[t].probabilities(pooled if self.heads[t].pooling == "mean" else first) for t in tasks}
        return Outputs(pooled, probs, first if cls else None, reps.cpu().numpy() if residues else None)
