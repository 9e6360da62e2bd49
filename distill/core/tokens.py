"""The one vocabulary shared by the teacher and every student: fair-esm's ESM-1b alphabet, in numpy only.

Sequences become ``<cls> residues <eos>`` exactly as ESM-1b's batch converter writes them; batches are
right-padded with ``<pad>``. The token list is fair-esm's ``Alphabet.from_architecture("ESM-1b").all_toks``
written out (a test checks it against fair-esm on real sequences), so that inference over ONNX Runtime needs
neither torch nor fair-esm.
"""

from __future__ import annotations

import numpy as np

MAX_RESIDUES = 1022  # ESM-1b's 1024 learned positions minus BOS and EOS
RESIDUE_LETTERS = "LAGVSERTIDPKQNFYMHWCXBUZO"  # the 25 letters of the ESM alphabet
STANDARD_AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"  # what BERT-style random replacement draws from
TOKENS = ("<cls>", "<pad>", "<eos>", "<unk>", *RESIDUE_LETTERS, ".", "-", "<null_1>", "<mask>")

CLS, PAD, EOS, MASK = (TOKENS.index(t) for t in ("<cls>", "<pad>", "<eos>", "<mask>"))
VOCAB_SIZE = len(TOKENS)
RESIDUE_IDS = np.array([TOKENS.index(c) for c in RESIDUE_LETTERS], dtype=np.int64)  # the only tokens that are ever MLM targets
AMINO_ACID_IDS = np.array([TOKENS.index(c) for c in STANDARD_AMINO_ACIDS], dtype=np.int64)

_LOOKUP = np.full(256, -1, dtype=np.int64)  # ASCII byte -> token id; -1 for characters that are not residues
_LOOKUP[np.frombuffer(RESIDUE_LETTERS.encode(), dtype=np.uint8)] = RESIDUE_IDS
_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def ascii_upper(text: str) -> str:
    """Upper-case ASCII letters only. ``str.upper`` maps some non-ASCII letters to ASCII ones ("ß" -> "SS",
    "ı" -> "I", "ﬃ" -> "FFI"), which would turn them into residues; here they stay, and validation names them."""
    return text.translate(_ASCII_UPPER)


def encode(sequence: str) -> np.ndarray:
    """Residue letters -> token ids, without BOS/EOS (added at batch time, after cropping)."""
    ids = _LOOKUP[np.frombuffer(sequence.encode("ascii"), dtype=np.uint8)]
    if (ids < 0).any():
        bad = int(np.flatnonzero(ids < 0)[0])
        raise ValueError(f"illegal residue {sequence[bad]!r} at position {bad + 1}")
    return ids.astype(np.uint8)  # 33 tokens fit a byte: a residue costs one byte in memory


def decode(ids: np.ndarray) -> str:
    """Residue token ids (no BOS/EOS/pad) -> letters."""
    return "".join(TOKENS[i] for i in np.asarray(ids).tolist())


def illegal_position(sequence: str) -> int | None:
    """0-based index of the first character that is not one of the 25 residue letters."""
    try:
        raw = np.frombuffer(sequence.encode("ascii"), dtype=np.uint8)
    except UnicodeEncodeError:  # non-ASCII as 0 (never a residue): the first bad character of either kind is reported
        raw = np.array([ord(c) if ord(c) < 128 else 0 for c in sequence], dtype=np.uint8)
    bad = np.flatnonzero(_LOOKUP[raw] < 0)
    return int(bad[0]) if len(bad) else None


def pad_batch(rows: list[np.ndarray]) -> np.ndarray:
    """Wrap each residue-id row in BOS/EOS and right-pad to the longest: int64 [batch, max_len + 2]."""
    width = max(len(r) for r in rows) + 2
    out = np.full((len(rows), width), PAD, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, 0] = CLS
        out[i, 1 : len(r) + 1] = r
        out[i, len(r) + 1] = EOS
    return out


def token_budget_groups(lengths: np.ndarray, index: np.ndarray, max_tokens: int) -> list[list[int]]:
    """Split ``index`` into groups whose padded size (rows x (longest + 2)) fits ``max_tokens``.

    Sorting by length first keeps similar lengths together, so padding stays small.
    """
    order = sorted(index.tolist(), key=lambda i: (lengths[i], i))
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[i] + 2
        if width > max_tokens:
            raise ValueError(
                f"--max-tokens {max_tokens} cannot hold one sequence of {lengths[i]} residues "
                f"({width} tokens with BOS/EOS); raise it to at least {width}"
            )
        if current and (len(current) + 1) * width > max_tokens:  # sorted: i is the longest so far
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups
