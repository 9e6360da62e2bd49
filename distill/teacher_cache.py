"""The teacher-logit cache: run the frozen teacher once, train any number of students from disk.

For K fixed, seeded maskings ("views") of every record of a FASTA file, the teacher's logits over
the 25 residue tokens are stored at the masked positions, in fp16. Training epoch ``e`` uses view
``e mod K``: its masks (and random crops) are exactly the ones the cache was built with, because
both come from the same keyed generator (``data.masked_example(seq, seed, view, record_index)``).
Logits, not temperature-scaled probabilities, are stored, so one cache serves every student of a
sweep: all sizes, temperatures and lambdas.

Layout (memory-mapped, sharded by record so a cache larger than RAM works)::

    CACHE/meta.json                        format, the key below, shard size, complete flag
    CACHE/v{view:03d}-s{shard:05d}.logits.npy    [masked positions, 25] float16
    CACHE/v{view:03d}-s{shard:05d}.offsets.npy   [records in shard + 1] int64, row offsets

A shard counts as done only once its offsets file exists; both files are written atomically and
offsets last, so a build killed at any point resumes at the first unfinished shard.

The key -- teacher spec and weights hash, data hash and record count, mask rate, seed, K and crop
policy -- is checked on use: a cache built for other settings is refused, never silently used.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distill import data, tokens
from distill.bundle import load_any
from distill.distributed import pick_device
from distill.evaluate import autocast
from distill.io import atomic_write, atomic_write_json, read_json_object
from distill.losses import residue_logits
from distill.model import ESM, weights_sha256

FORMAT = "esm-distill-teacher-cache"
VERSION = 1
CROP_POLICY = f"train: random {tokens.MAX_RESIDUES}-residue window keyed by (seed, view, record)"


class CacheMismatch(ValueError):
    """The cache was built for other settings than the run asks for."""


@dataclass(frozen=True)
class CacheKey:
    teacher: str
    teacher_sha256: str
    data_sha256: str
    n_records: int
    mask_rate: float
    seed: int
    views: int
    crop: str = CROP_POLICY
    residue_tokens: str = tokens.RESIDUE_LETTERS

    def differences(self, other: CacheKey, ignore: tuple[str, ...] = ()) -> list[str]:
        a, b = asdict(self), asdict(other)
        return [f"{k}: cache has {a[k]!r}, run has {b[k]!r}" for k in a if k not in ignore and a[k] != b[k]]


def _shard_paths(root: Path, view: int, shard: int) -> tuple[Path, Path]:
    stem = root / f"v{view:03d}-s{shard:05d}"
    return stem.with_suffix(".logits.npy"), stem.with_suffix(".offsets.npy")


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


@torch.no_grad()
def build(
    seqs: data.SequenceSet,
    teacher: ESM,
    key: CacheKey,
    out: Path,
    max_tokens: int,
    device: torch.device,
    shard_size: int = 4096,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run ``teacher`` over K views of ``seqs`` into ``out`` (resuming a partial build)."""
    out = Path(out)
    meta_path = out / "meta.json"
    if meta_path.exists():
        meta = _read_meta(out)
        existing = CacheKey(**meta["key"])
        if diff := existing.differences(key):
            raise CacheMismatch(f"{out} already holds a cache for other settings ({'; '.join(diff)}); choose another -o or delete it")
        shard_size = meta["shard_size"]
    out.mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(seqs) // shard_size)
    meta = {"format": FORMAT, "version": VERSION, "key": asdict(key), "shard_size": shard_size, "n_shards": n_shards, "complete": False}
    atomic_write_json(meta_path, meta)

    lengths = seqs.lengths()
    todo = [(v, s) for v in range(key.views) for s in range(n_shards) if not _shard_paths(out, v, s)[1].exists()]
    console = Console(stderr=True, soft_wrap=True, quiet=quiet)
    if len(todo) < key.views * n_shards:
        console.print(f"resuming {out}: {key.views * n_shards - len(todo)} of {key.views * n_shards} shards already done")
    t0, residues = time.perf_counter(), 0
    progress = Progress(
        TextColumn("teacher cache"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console, disable=quiet
    )
    with progress:
        task = progress.add_task("cache", total=sum(min(shard_size, len(seqs) - s * shard_size) for _, s in todo))
        for view, shard in todo:
            index = np.arange(shard * shard_size, min(len(seqs), (shard + 1) * shard_size))
            per_record: dict[int, np.ndarray] = {}
            for group in tokens.token_budget_groups(lengths, index, max_tokens):
                examples = [data.masked_example(seqs.seqs[i], key.seed, view, int(seqs.keys[i]), key.mask_rate, train=True) for i in group]
                batch = data.collate(examples, group)
                toks, labels = batch.tokens.to(device), batch.labels.to(device)
                with autocast(device):
                    logits = residue_logits(teacher(toks)["logits"]).float()
                for row, i in enumerate(group):
                    per_record[i] = logits[row][labels[row] != data.IGNORE].to(torch.float16).cpu().numpy()
                residues += batch.n_real
                progress.advance(task, len(group))
            counts = np.array([len(per_record[i]) for i in index], dtype=np.int64)
            logits_path, offsets_path = _shard_paths(out, view, shard)
            _save_npy(logits_path, np.concatenate([per_record[i] for i in index]).reshape(-1, len(tokens.RESIDUE_LETTERS)))
            _save_npy(offsets_path, np.concatenate([[0], np.cumsum(counts)]))  # last: marks the shard done
    seconds = time.perf_counter() - t0
    total_bytes = sum(p.stat().st_size for p in out.glob("*.npy"))
    meta.update(complete=True, bytes=total_bytes, bytes_per_residue_per_view=total_bytes / key.views / max(1, int(lengths.sum())))
    atomic_write_json(meta_path, meta)
    return {"seconds": seconds, "tokens": residues, "bytes": total_bytes}


def _read_meta(root: Path) -> dict[str, Any]:
    path = Path(root) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not a teacher cache (no meta.json); build one with `distill teacher-cache`")
    meta = read_json_object(path)
    if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
        raise ValueError(f"{path} is not an esm-distill teacher cache of version <= {VERSION}")
    return meta


class TeacherCache:
    """Read side: teacher residue logits for (view, records), in the order training selects them."""

    def __init__(self, root: Path):
        self.root = Path(root)
        meta = _read_meta(self.root)
        self.key = CacheKey(**meta["key"])
        self.shard_size = meta["shard_size"]
        missing = [(v, s) for v in range(self.key.views) for s in range(meta["n_shards"]) if not _shard_paths(self.root, v, s)[1].exists()]
        if missing or not meta.get("complete"):
            raise ValueError(
                f"teacher cache {self.root} is incomplete ({len(missing)} of {self.key.views * meta['n_shards']} shards missing): "
                "a build was interrupted; rerun the same `distill teacher-cache` command to finish it"
            )
        self._open: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def check(self, expected: CacheKey, ignore: tuple[str, ...] = ()) -> None:
        if diff := self.key.differences(expected, ignore):
            raise CacheMismatch(f"teacher cache {self.root} does not match this run: {'; '.join(diff)}")

    def _shard(self, view: int, shard: int) -> tuple[np.ndarray, np.ndarray]:
        if (view, shard) not in self._open:
            logits_path, offsets_path = _shard_paths(self.root, view, shard)
            self._open[(view, shard)] = (np.load(logits_path, mmap_mode="r"), np.load(offsets_path))
        return self._open[(view, shard)]

    def logits(self, view: int, record_keys: list[int]) -> torch.Tensor:
        """[sum of masked positions, 25] float32, records concatenated in the given order."""
        parts = []
        for k in record_keys:
            shard, row = divmod(int(k), self.shard_size)
            logits, offsets = self._shard(view % self.key.views, shard)
            parts.append(logits[offsets[row] : offsets[row + 1]])
        return torch.from_numpy(np.concatenate(parts).astype(np.float32))


def load_teacher(spec: str, device: torch.device) -> tuple[ESM, str]:
    """Frozen teacher (eval mode, no gradients, bf16 on CUDA) and the sha256 of its weights."""
    teacher = load_any(spec)[0].eval().requires_grad_(False)  # fair-esm, Hugging Face, or a bundle as the teacher
    sha = weights_sha256(teacher)
    return teacher.to(device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32), sha


def build_command(
    fasta: Path,
    output: Path,
    teacher: str,
    views: int,
    seed: int,
    mask_rate: float,
    max_tokens: int,
    shard_size: int,
    device: str,
    quiet: bool,
) -> tuple[Path, dict[str, Any], int]:
    """`distill teacher-cache`: load DATA and the teacher, build (or resume) the cache -> (output, stats, sequences)."""
    if views < 1 or shard_size < 1:
        raise ValueError("--views and --shard-size must be at least 1")
    dev = pick_device(device)
    seqs = data.load_fasta(fasta)
    net, sha = load_teacher(teacher, dev)
    key = CacheKey(
        teacher=teacher, teacher_sha256=sha, data_sha256=data.dataset_fingerprint(fasta),
        n_records=len(seqs), mask_rate=mask_rate, seed=seed, views=views,
    )  # fmt: skip
    return output, build(seqs, net, key, output, max_tokens, dev, shard_size, quiet), len(seqs)
