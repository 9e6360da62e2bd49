"""`distill annotate --url`: the BentoML service as a backend, with the same interface as the local ones.

It calls the service's ``info`` (model name, dimension, labels) once and ``annotate`` per chunk, which
returns full probability vectors (not only top-k), so over-long sequences are windowed and averaged on
this side exactly as locally: the same output either way.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import numpy as np


class ServiceError(RuntimeError):
    """The service refused or failed a request; the message carries its answer."""


class HttpBackend:
    def __init__(self, url: str, timeout: float = 600.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        info = self._post("info", {})
        self.max_sequences, self.max_residues = int(info["max_sequences"]), int(info["max_residues"])
        self.name = info["model"]
        self.dim = int(info["dim"])
        self.labels: dict[str, list[str]] = info["labels"]
        self.thresholds: dict[str, float] = info.get("min_probability", {})  # calibrated no-call thresholds
        self.metadata: dict[str, Any] = {"service": self.url, "backend": info.get("backend"), "preset": info.get("preset")}

    def _post(self, endpoint: str, payload: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            f"{self.url}/{endpoint}", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise ServiceError(f"{self.url}/{endpoint} answered {e.code}: {e.read().decode(errors='replace')[:500]}") from e
        except urllib.error.URLError as e:
            raise ServiceError(f"cannot reach the service at {self.url} ({e.reason}); is `distill serve` running?") from e

    def requests(self, sequences: list[str]) -> list[list[str]]:
        """Consecutive groups within the service's per-request limits (sequences and residues)."""
        groups: list[list[str]] = [[]]
        residues = 0
        for s in sequences:
            if groups[-1] and (len(groups[-1]) == self.max_sequences or residues + len(s) > self.max_residues):
                groups.append([])
                residues = 0
            groups[-1].append(s)
            residues += len(s)
        return groups

    def run(self, sequences: list[str], tasks: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        vectors, probs = [], {t: [] for t in tasks}
        for group in self.requests(sequences):
            answer = self._post("annotate", {"sequences": group, "tasks": tasks, "all_tasks": False})
            vectors.append(np.asarray(answer["embeddings"], dtype=np.float32))
            for t in tasks:
                probs[t].append(np.asarray(answer["probabilities"][t], dtype=np.float32))
        return np.concatenate(vectors), {t: np.concatenate(p) for t, p in probs.items()}
