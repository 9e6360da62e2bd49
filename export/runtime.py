"""One inference class over ONNX Runtime: raw sequences in, embeddings out.

Sequences are tokenised exactly as in training (ESM-1b alphabet, ``<cls> ... <eos>``), sorted by length
and cut into token-budget batches (little padding), run through the graph, and returned in input order.
Used by the BentoML service and by ``distill annotate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill import data, tokens

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


class SequenceError(ValueError):
    """A bad input sequence; ``index`` says which one."""

    def __init__(self, index: int, message: str):
        super().__init__(f"sequence {index}: {message}")
        self.index = index


def select_providers(choice: str = "auto") -> list[str]:
    """CUDA when onnxruntime-gpu sees a GPU, else CPU; or exactly the one asked for (CPU as fallback)."""
    import onnxruntime as ort

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


@dataclass
class Embedding:
    sequence: np.ndarray  # [dim]: mean over real residues
    residues: np.ndarray | None  # [length, dim] without BOS/EOS, when asked for
    cropped: bool  # True when only the leading 1,022 residues were embedded


class OnnxEmbedder:
    def __init__(self, path: Path, providers: str = "auto", max_tokens: int = 16384):
        import onnxruntime as ort

        from export.onnx import OUTPUTS, read_metadata

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX graph {path} does not exist")
        self.metadata = read_metadata(path)
        if self.metadata.get("esm_distill_contract") is None:
            raise ValueError(f"{path} is not an esm-distill graph (no esm_distill_contract in its metadata)")
        self.session = ort.InferenceSession(str(path), providers=select_providers(providers))
        self.int32 = self.session.get_inputs()[0].type == "tensor(int32)"
        self.outputs = OUTPUTS
        self.max_tokens = max_tokens
        self.dim = int(self.metadata["architecture"]["dim"])

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def encode(self, sequences: list[str], crop: bool = False) -> list[tuple[np.ndarray, bool]]:
        """Validate and tokenise; bad sequences raise ``SequenceError`` naming index and position."""
        out = []
        for i, seq in enumerate(sequences):
            if not isinstance(seq, str) or not seq.strip():
                raise SequenceError(i, "empty sequence")
            seq = seq.strip().upper()
            bad = tokens.illegal_position(seq)
            if bad is not None:
                raise SequenceError(i, f"illegal residue {seq[bad]!r} at position {bad + 1}; allowed: {tokens.RESIDUE_LETTERS}")
            if len(seq) > tokens.MAX_RESIDUES and not crop:
                raise SequenceError(
                    i,
                    f"{len(seq)} residues exceed the limit of {tokens.MAX_RESIDUES} (ask for crop to embed the first {tokens.MAX_RESIDUES})",
                )
            ids = tokens.encode(seq)
            out.append((data.crop(ids, None), len(ids) > tokens.MAX_RESIDUES))
        return out

    def embed(self, sequences: list[str], per_residue: bool = False, crop: bool = False) -> list[Embedding]:
        encoded = self.encode(sequences, crop)
        lengths = np.array([len(ids) for ids, _ in encoded], dtype=np.int64)
        results: list[Embedding | None] = [None] * len(encoded)
        wanted = ["sequence_embedding", "residue_embeddings"] if per_residue else ["sequence_embedding"]
        for group in data.token_budget_groups(lengths, np.arange(len(encoded)), self.max_tokens):
            batch = tokens.pad_batch([encoded[i][0] for i in group]).numpy()
            outs = self.session.run(wanted, {"tokens": batch.astype(np.int32 if self.int32 else np.int64)})
            for row, i in enumerate(group):
                residues = outs[1][row, 1 : lengths[i] + 1].copy() if per_residue else None
                results[i] = Embedding(outs[0][row].copy(), residues, encoded[i][1])
        return results
