"""One inference class over ONNX Runtime: raw sequences in, embeddings out.

Sequences are tokenised exactly as in training (ESM-1b alphabet, ``<cls> ... <eos>``), sorted by length
and cut into token-budget batches (little padding), run through the graph, and returned in input order.
Used by the BentoML service and by ``distill annotate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)  # per head task: [n_labels]
    cls: np.ndarray | None = None  # [dim]: the <cls> token's last-layer vector, when asked for


def heads_asked(labels: dict[str, list[str]], tasks: list[str] | None) -> list[str]:
    """The asked-for head tasks (default: all of them); an unknown one is an error naming what exists."""
    tasks = list(labels) if tasks is None else tasks
    unknown = [t for t in tasks if t not in labels]
    if unknown:
        raise ValueError(f"no {', '.join(unknown)} head in this model (heads: {', '.join(labels) or 'none'}); add one with `distill probe`")
    return tasks


def top_k(probabilities: np.ndarray, labels: list[str], k: int) -> list[tuple[str, float]]:
    """The k most probable labels, best first (ties broken by label order)."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(labels[i], float(probabilities[i])) for i in order]


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
        self.labels: dict[str, list[str]] = self.metadata.get("labels") or {}  # head task -> label names
        heads = self.metadata.get("heads") or {}
        self.thresholds = {t: float(heads.get(t, {}).get("calibration", {}).get("threshold", 0.0)) for t in self.labels}  # no-call
        self.name = path.name

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def encode(self, sequences: list[str], crop: bool = False) -> list[tuple[np.ndarray, bool]]:
        """Validate and tokenise; bad sequences raise ``SequenceError`` naming index and position."""
        return [(data.crop(ids, None), len(ids) > tokens.MAX_RESIDUES) for ids in map(tokens.encode, validate(sequences, crop))]

    def run(self, sequences: list[str], tasks: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return stack(self.embed(sequences, tasks=tasks), tasks, self.dim)

    def embed(
        self, sequences: list[str], per_residue: bool = False, crop: bool = False, tasks: list[str] | None = None, cls: bool = False
    ) -> list[Embedding]:
        """Embeddings in input order; ``tasks`` (default: every head in the graph) adds head probabilities."""
        tasks = heads_asked(self.labels, tasks)
        encoded = self.encode(sequences, crop)
        lengths = np.array([len(ids) for ids, _ in encoded], dtype=np.int64)
        results: list[Embedding | None] = [None] * len(encoded)
        wanted = ["sequence_embedding", *(f"{t}_probabilities" for t in tasks)] + (["residue_embeddings"] if per_residue or cls else [])
        for group in data.token_budget_groups(lengths, np.arange(len(encoded)), self.max_tokens):
            batch = tokens.pad_batch([encoded[i][0] for i in group]).numpy()
            outs = self.session.run(wanted, {"tokens": batch.astype(np.int32 if self.int32 else np.int64)})
            for row, i in enumerate(group):
                residues = outs[-1][row, 1 : lengths[i] + 1].copy() if per_residue else None
                probs = {t: outs[1 + k][row].copy() for k, t in enumerate(tasks)}
                first = outs[-1][row, 0].copy() if cls else None
                results[i] = Embedding(outs[0][row].copy(), residues, encoded[i][1], probs, first)
        return results


def validate(sequences: list[str], crop: bool = False) -> list[str]:
    """Upper-cased sequences, or ``SequenceError`` naming the index and the problem (shared by every backend)."""
    out = []
    for i, seq in enumerate(sequences):
        if not isinstance(seq, str) or not seq.strip():
            raise SequenceError(i, "empty sequence")
        seq = tokens.ascii_upper(seq.strip())
        bad = tokens.illegal_position(seq)
        if bad is not None:
            raise SequenceError(i, f"illegal residue {seq[bad]!r} at position {bad + 1}; allowed: {tokens.RESIDUE_LETTERS}")
        if len(seq) > tokens.MAX_RESIDUES and not crop:
            raise SequenceError(
                i, f"{len(seq)} residues exceed the limit of {tokens.MAX_RESIDUES} (ask for crop to embed the first {tokens.MAX_RESIDUES})"
            )
        out.append(seq)
    return out


class TorchEmbedder:
    """The same interface as ``OnnxEmbedder`` over a PyTorch model (a bundle, or ESM-1b with probed heads).

    CUDA (bf16 autocast) when available, else CPU. ``heads`` maps task -> ``distill.probe.Head``.
    """

    def __init__(
        self, model, heads: dict | None = None, name: str = "", metadata: dict | None = None, device: str = "auto", max_tokens: int = 16384
    ):  # noqa: ANN001
        import torch

        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
        self.model = model.to(self.device).eval()
        self.heads = heads or {}
        self.name = name
        self.dim = model.cfg.dim
        self.labels = {t: h.labels for t, h in self.heads.items()}
        self.thresholds = {t: h.min_probability for t, h in self.heads.items()}  # no-call below these
        self.metadata = {"architecture": model.cfg.to_dict(), "parameters": model.num_parameters(), **(metadata or {})}
        self.max_tokens = max_tokens

    @property
    def provider(self) -> str:
        return f"torch-{self.device.type}"

    def embed(
        self, sequences: list[str], per_residue: bool = False, crop: bool = False, tasks: list[str] | None = None, cls: bool = False
    ) -> list[Embedding]:
        import torch

        from distill.model import sequence_embedding

        tasks = heads_asked(self.labels, tasks)
        seqs = validate(sequences, crop)
        encoded = [data.crop(tokens.encode(s), None) for s in seqs]
        lengths = np.array([len(e) for e in encoded], dtype=np.int64)
        results: list[Embedding | None] = [None] * len(seqs)
        for group in data.token_budget_groups(lengths, np.arange(len(seqs)), self.max_tokens):
            toks = tokens.pad_batch([encoded[i] for i in group]).to(self.device)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                reps = self.model(toks)["representations"].float()
            pooled = sequence_embedding(reps, toks)
            probs = {}
            for t in tasks:
                x = pooled if self.heads[t].pooling == "mean" else reps[:, 0]
                probs[t] = self.heads[t].probabilities(x.cpu().numpy())
            pooled_np = pooled.cpu().numpy()
            reps_np = reps.cpu().numpy() if per_residue else None
            cls_np = reps[:, 0].cpu().numpy() if cls else None
            for row, i in enumerate(group):
                residues = reps_np[row, 1 : lengths[i] + 1].copy() if per_residue else None
                first = cls_np[row].copy() if cls else None
                long = len(seqs[i]) > tokens.MAX_RESIDUES
                results[i] = Embedding(pooled_np[row].copy(), residues, long, {t: probs[t][row] for t in tasks}, first)
        return results

    def run(self, sequences: list[str], tasks: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return stack(self.embed(sequences, tasks=tasks), tasks, self.dim)


def stack(embeddings: list[Embedding], tasks: list[str], dim: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """List of ``Embedding`` -> ([n, dim] matrix, task -> [n, labels] matrix): what ``distill annotate`` consumes."""
    vectors = np.stack([e.sequence for e in embeddings]) if embeddings else np.zeros((0, dim), np.float32)
    return vectors, {t: np.stack([e.probabilities[t] for e in embeddings]) for t in tasks}


def load_embedder(spec: str, heads: str | None = None, providers: str = "auto", max_tokens: int = 16384):  # noqa: ANN201
    """One place that turns a model argument into an inference object.

    ``X.onnx`` -> ``OnnxEmbedder`` (heads are in the graph); a student bundle -> ``TorchEmbedder`` with the
    bundle's heads; a fair-esm name / ``.pt`` (ESM-1b) -> ``TorchEmbedder`` with the heads in ``heads`` (a
    directory of ``<task>/`` head folders, as ``distill probe --out`` writes them).
    """
    from distill.bundle import is_bundle, load_any
    from distill.probe import heads_of, load_head

    path = Path(spec)
    if path.suffix == ".onnx":
        return OnnxEmbedder(path, providers, max_tokens)
    model, card = load_any(spec)
    found = {}
    if heads:
        hp = Path(heads)
        found = (
            {hp.name: load_head(hp, model.cfg.dim)}
            if (hp / "labels.json").is_file()
            else {d.name: load_head(d, model.cfg.dim) for d in sorted(hp.iterdir()) if (d / "labels.json").is_file()}
        )
    elif is_bundle(path):
        found = heads_of(path, model.cfg.dim)
    device = "cpu" if providers == "cpu" else "auto"
    name = path.name if path.exists() else spec
    return TorchEmbedder(model, found, name, {"source": spec, "preset": card.get("preset")}, device, max_tokens)
