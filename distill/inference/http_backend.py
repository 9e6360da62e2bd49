"""The BentoML service as a backend (``distill annotate --url``): the same layer, the forward pass remote.

It reads the service's ``info`` (model name, dimension, labels, per-request limits) once and sends each batch
to ``annotate``, which returns full probability vectors, so validation, windows and averaging happen on this
side exactly as locally: the same output either way.
"""

from __future__ import annotations

import base64
import json
import random
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from distill.core.errors import UserError
from distill.inference.layer import Outputs

BUSY_RETRIES = 120  # a busy service (503 + Retry-After) is asked again this many times before the error


class ServiceError(UserError):
    """The service refused or failed a request; the message carries its answer."""


class HttpBackend:
    provider = "http"

    def __init__(self, url: str, timeout: float = 600.0, api_key: str = ""):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.api_key = api_key
        info = self._post("info", {})
        self.max_rows, self.max_tokens = int(info["max_sequences"]), int(info["max_residues"])  # per-request limits
        self.name = info["model"]
        self.dim = int(info["dim"])
        self.labels: dict[str, list[str]] = info["labels"]
        self.thresholds: dict[str, float] = info.get("min_probability", {})  # calibrated no-call thresholds
        self.calibrations: dict[str, dict] = info.get("calibration", {})  # per-label thresholds, scanning
        self.metadata: dict[str, Any] = {"service": self.url, "backend": info.get("backend"), "preset": info.get("preset")}

    def _post(self, endpoint: str, payload: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            f"{self.url}/{endpoint}",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})},
        )
        for attempt in range(BUSY_RETRIES + 1):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                if e.code == 503 and attempt < BUSY_RETRIES:  # busy (its concurrency cap): ask again when it says
                    time.sleep(float(e.headers.get("Retry-After") or 1) * random.uniform(0.5, 1.5))  # jitter: not all at once
                    continue
                raise ServiceError(f"{self.url}/{endpoint} answered {e.code}: {e.read().decode(errors='replace')[:500]}") from e
            except urllib.error.URLError as e:
                raise ServiceError(f"cannot reach the service at {self.url} ({e.reason}); is `distill serve` running?") from e
        raise AssertionError("unreachable")

    def forward(self, batch: np.ndarray, sequences: list[str], tasks: list[str], residues: bool, cls: bool) -> Outputs:
        if residues or cls:
            raise ValueError("a service backend returns mean sequence embeddings only (no per-residue or <cls> vectors)")
        # float32 bytes, not decimal text: a quarter of the bytes and no number parsing on either side
        answer = self._post("annotate", {"sequences": sequences, "tasks": tasks, "all_tasks": False, "encoding": "float32-base64"})
        probs = {t: np.asarray(answer["probabilities"][t], dtype=np.float32) for t in tasks}
        vectors = np.frombuffer(base64.b64decode(answer["embeddings_b64"]), dtype="<f4").reshape(len(sequences), -1)
        return Outputs(vectors.astype(np.float32), probs)
