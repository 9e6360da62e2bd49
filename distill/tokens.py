"""The one vocabulary shared by the teacher and every student: fair-esm's ESM-1b alphabet.

Sequences become ``<cls> residues <eos>`` exactly as ESM-1b's batch converter writes them;
batches are right-padded with ``<pad>``.
"""

from __future__ import annotations

from functools import lru_cache

import esm
import numpy as np
import torch

MAX_RESIDUES = 1022  # ESM-1b's 1024 learned positions minus BOS and EOS
RESIDUE_LETTERS = "LAGVSERTIDPKQNFYMHWCXBUZO"  # the 25 letters of the ESM alphabet
STANDARD_AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"  # what BERT-style random replacement draws from


@lru_cache(maxsize=1)
def alphabet() -> esm.Alphabet:
    return esm.Alphabet.from_architecture("ESM-1b")


def _ids(letters: str) -> np.ndarray:
    return np.array([alphabet().get_idx(c) for c in letters], dtype=np.int64)


@lru_cache(maxsize=1)
def _lookup() -> np.ndarray:
    """ASCII byte -> token id; -1 for characters that are not residues."""
    table = np.full(256, -1, dtype=np.int64)
    table[np.frombuffer(RESIDUE_LETTERS.encode(), dtype=np.uint8)] = _ids(RESIDUE_LETTERS)
    return table


PAD = alphabet().padding_idx
CLS = alphabet().cls_idx
EOS = alphabet().eos_idx
MASK = alphabet().mask_idx
VOCAB_SIZE = len(alphabet().all_toks)
RESIDUE_IDS = torch.from_numpy(_ids(RESIDUE_LETTERS))  # the only tokens that are ever MLM targets
AMINO_ACID_IDS = _ids(STANDARD_AMINO_ACIDS)


_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def ascii_upper(text: str) -> str:
    """Upper-case ASCII letters only. ``str.upper`` maps some non-ASCII letters to ASCII ones ("ß" -> "SS",
    "ı" -> "I", "ﬃ" -> "FFI"), which would turn them into residues; here they stay, and validation names them."""
    return text.translate(_ASCII_UPPER)


def encode(sequence: str) -> np.ndarray:
    """Residue letters -> token ids, without BOS/EOS (added at batch time, after cropping)."""
    ids = _lookup()[np.frombuffer(sequence.encode("ascii"), dtype=np.uint8)]
    if (ids < 0).any():
        bad = int(np.flatnonzero(ids < 0)[0])
        raise ValueError(f"illegal residue {sequence[bad]!r} at position {bad + 1}")
    return ids.astype(np.uint8)  # 33 tokens fit a byte: a residue costs one byte in memory


def illegal_position(sequence: str) -> int | None:
    """0-based index of the first character that is not one of the 25 residue letters."""
    try:
        raw = np.frombuffer(sequence.encode("ascii"), dtype=np.uint8)
    except UnicodeEncodeError:
        return next(i for i, c in enumerate(sequence) if ord(c) > 127)
    bad = np.flatnonzero(_lookup()[raw] < 0)
    return int(bad[0]) if len(bad) else None


def pad_batch(rows: list[np.ndarray]) -> torch.Tensor:
    """Wrap each residue-id row in BOS/EOS and right-pad to the longest: [batch, max_len + 2]."""
    width = max(len(r) for r in rows) + 2
    out = np.full((len(rows), width), PAD, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, 0] = CLS
        out[i, 1 : len(r) + 1] = r
        out[i, len(r) + 1] = EOS
    return torch.from_numpy(out)
