"""ONNX Runtime backend: an exported esm-distill graph (``distill export onnx``), with its heads as outputs.

Needs neither torch nor fair-esm: the graph's metadata is read through ONNX Runtime itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidProtobuf

from distill.inference.layer import Outputs

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
OUTPUTS = ["logits", "residue_embeddings", "sequence_embedding"]  # the export contract; heads add <task>_probabilities


def select_providers(choice: str = "auto") -> list[str]:
    """CUDA when onnxruntime-gpu sees a GPU, else CPU; or exactly the one asked for (CPU as fallback)."""
    available = ort.get_available_providers()
    if choice == "auto":
        return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]
    if choice not in PROVIDERS:
        raise ValueError(f"unknown provider {choice!r}; choose auto, {', '.join(PROVIDERS)}")
    if PROVIDERS[choice] not in available:
        raise ValueError(
            f"ONNX Runtime provider {PROVIDERS[choice]} is not available here (available: {', '.join(available)}); "
            "for GPUs install the extra: pip install 'esm-distill[gpu]'"
        )
    return [PROVIDERS[choice]] + (["CPUExecutionProvider"] if choice != "cpu" else [])


def session_metadata(session: Any) -> dict[str, Any]:
    """The graph's metadata properties, JSON values decoded."""
    out: dict[str, Any] = {}
    for key, value in session.get_modelmeta().custom_metadata_map.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


class OnnxBackend:
    def __init__(self, path: Path, providers: str = "auto", threads: int = 0, arena: bool = True):
        """``threads``: intra-op threads (0: ONNX Runtime's default, one per physical core). ``arena``: ONNX Runtime's
        CPU memory arena, which keeps the largest batch's memory for good; the service turns it off so memory comes
        back after a burst (a worker at its cap: 4.1 GB kept after the burst with it, 0.45 GB without; about 13%
        fewer sequences/s, docs/benchmarks.md)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX graph {path} does not exist")
        chosen = select_providers(providers)
        try:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.enable_cpu_mem_arena = arena
            self.session = ort.InferenceSession(str(path), options, providers=chosen)
        except (Fail, InvalidArgument, InvalidProtobuf) as e:  # a truncated or foreign file
            raise ValueError(f"{path} is not a readable ONNX graph: {e}") from e
        self.metadata = session_metadata(self.session)
        if self.metadata.get("esm_distill_contract") is None:
            raise ValueError(f"{path} is not an esm-distill graph (no esm_distill_contract in its metadata)")
        self.int32 = self.session.get_inputs()[0].type == "tensor(int32)"
        self.dim = int(self.metadata["architecture"]["dim"])
        self.labels: dict[str, list[str]] = self.metadata.get("labels") or {}
        heads = self.metadata.get("heads") or {}
        self.calibrations = {t: heads.get(t, {}).get("calibration", {}) for t in self.labels}
        self.thresholds = {t: float(c.get("threshold", 0.0)) for t, c in self.calibrations.items()}
        self.name = path.name
        self.max_tokens = None
        # dynamic-int8 graphs scale activations per tensor, over the whole batch: run them one sequence at a time
        self.max_rows = 1 if self.metadata.get("one_sequence_per_run") else None

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def forward(self, batch: np.ndarray, sequences: list[str], tasks: list[str], residues: bool, cls: bool) -> Outputs:
        wanted = ["sequence_embedding", *(f"{t}_probabilities" for t in tasks)] + (["residue_embeddings"] if residues or cls else [])
        outs = self.session.run(wanted, {"tokens": batch.astype(np.int32 if self.int32 else np.int64)})
        reps = outs[-1] if residues or cls else None
        return Outputs(
            outs[0],
            {t: outs[1 + k] for k, t in enumerate(tasks)},
            reps[:, 0] if cls else None,
            reps if residues else None,
        )
