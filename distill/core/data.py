"""FASTA -> token arrays -> cropped, masked, token-budget batches.

All randomness is keyed, never drawn from a global stream: the crop and mask of sequence ``i`` in
epoch ``e`` come from ``default_rng([seed, e, i])``. So a resumed run, a run on more processes, or
a run with another ``--max-tokens`` sees exactly the same masked sequences.

Policies (documented in the README):
- sequences over 1022 residues: a random 1022-residue window in training, the leading
  (N-terminal) 1022 residues in evaluation;
- masking: ``round(rate * L)`` residues (at least one) drawn without replacement, never BOS/EOS/pad;
  of those 80% become ``<mask>``, 10% a random standard amino acid, 10% stay (BERT);
- validation split: a record goes to validation when a stable hash (BLAKE2b) of its id falls under
  the fraction, so the split does not change when the file is reordered or grows.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distill.core import tokens
from distill.core.fasta import read_fasta
from distill.core.io import sha256_file

IGNORE = -100  # cross-entropy ignore index for positions that are not MLM targets
EVAL_SEED = 20240601  # fixed masking seed of every evaluation, so perplexities compare


@dataclass
class SequenceSet:
    ids: list[str]
    seqs: list[np.ndarray]  # residue token ids (uint8), no BOS/EOS, uncropped
    keys: np.ndarray  # each record's index in its FASTA file: the key of its masks (and cache rows)

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        return np.minimum(np.array([len(s) for s in self.seqs], dtype=np.int64), tokens.MAX_RESIDUES)

    def subset(self, index: np.ndarray) -> SequenceSet:
        return SequenceSet([self.ids[i] for i in index], [self.seqs[i] for i in index], self.keys[index])


def load_fasta(path: Path) -> SequenceSet:
    ids, seqs = [], []
    for record in read_fasta(path):
        ids.append(record.id)
        seqs.append(tokens.encode(record.sequence))
    if not ids:
        raise ValueError(f"{path} holds no FASTA records")
    return SequenceSet(ids, seqs, np.arange(len(ids)))


def dataset_fingerprint(path: Path) -> str:
    return sha256_file(path)


def sequence_digests(seqs: list[np.ndarray]) -> np.ndarray:
    """8-byte BLAKE2b of each residue-id row: what a bundle stores to detect train/test overlap."""
    return np.array([int.from_bytes(hashlib.blake2b(s.tobytes(), digest_size=8).digest(), "little") for s in seqs], dtype=np.uint64)


def in_validation(record_id: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(record_id.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


def split(data: SequenceSet, fraction: float) -> tuple[SequenceSet, SequenceSet]:
    is_valid = np.array([in_validation(i, fraction) for i in data.ids], dtype=bool)
    return data.subset(np.flatnonzero(~is_valid)), data.subset(np.flatnonzero(is_valid))


def crop(seq: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """At most 1022 residues: a random window when ``rng`` is given (training), else the first."""
    if len(seq) <= tokens.MAX_RESIDUES:
        return seq
    start = int(rng.integers(0, len(seq) - tokens.MAX_RESIDUES + 1)) if rng is not None else 0
    return seq[start : start + tokens.MAX_RESIDUES]


def mask(seq: np.ndarray, rng: np.random.Generator, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of one residue array -> (input ids, labels with IGNORE off the targets)."""
    n = max(1, int(round(rate * len(seq))))
    pos = rng.choice(len(seq), size=n, replace=False)
    roll = rng.random(n)
    inp = seq.astype(np.int64)
    labels = np.full(len(seq), IGNORE, dtype=np.int64)
    labels[pos] = inp[pos]
    inp[pos[roll < 0.8]] = tokens.MASK
    swap = pos[(roll >= 0.8) & (roll < 0.9)]
    inp[swap] = rng.choice(tokens.AMINO_ACID_IDS, size=len(swap))
    return inp, labels


def masked_example(seq: np.ndarray, seed: int, epoch: int, key: int, rate: float, train: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, epoch, key])
    return mask(crop(seq, rng if train else None), rng, rate)


def eval_key(record_id: str) -> int:
    """Evaluation masks are keyed by record id, so a protein is masked alike in every file."""
    return zlib.crc32(record_id.encode())


@dataclass
class Batch:
    tokens: torch.Tensor  # [batch, length] int64, BOS ... EOS, right-padded
    labels: torch.Tensor  # [batch, length] int64, IGNORE off the masked positions
    index: list[int]  # which sequences of the set, in row order

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE).sum())

    @property
    def n_real(self) -> int:
        return int((self.tokens != tokens.PAD).sum())


def collate(examples: list[tuple[np.ndarray, np.ndarray]], index: list[int]) -> Batch:
    toks = torch.from_numpy(tokens.pad_batch([inp for inp, _ in examples]))
    labels = torch.full(toks.shape, IGNORE, dtype=torch.int64)
    for row, (_, lab) in enumerate(examples):
        labels[row, 1 : len(lab) + 1] = torch.from_numpy(lab)
    return Batch(toks, labels, index)


def plan_epoch(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, window_batches: int = 32) -> list[np.ndarray]:
    """The optimizer steps of one epoch: each a set of ``batch_size`` sequence indices.

    Shuffled, then sorted by length inside windows of ``window_batches`` steps (fairseq-style
    bucketing: a step's sequences have similar lengths), then the steps themselves shuffled.
    """
    rng = np.random.default_rng([seed, epoch, 2**31])
    perm = rng.permutation(len(lengths))
    steps: list[np.ndarray] = []
    window = batch_size * window_batches
    for w in range(0, len(perm), window):
        chunk = perm[w : w + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        steps += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [steps[i] for i in rng.permutation(len(steps))]


def padding_fraction(batches: list[Batch]) -> float:
    total = sum(b.tokens.numel() for b in batches)
    return 1 - sum(b.n_real for b in batches) / total if total else 0.0
