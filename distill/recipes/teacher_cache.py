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

A causal teacher (UniRep) predicts residue i from the residues before it, whatever the masking, so its logits at
every residue of a record are computed once and each view takes its masked positions from them: K views cost one
teacher pass (records longer than 1,022 residues, whose window moves with the view, still run once per view). Such
a cache also stores the teacher's pooled embedding of each record (``s{shard:05d}.pooled.npy``, [records, dim]
float16, of the record's leading 1,022 residues) for pooled representation distillation.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distill.core import data, tokens
from distill.core.bundle import load_any
from distill.core.distributed import pick_device
from distill.core.io import atomic_write, atomic_write_json, read_json_object
from distill.core.losses import residue_logits
from distill.core.model import ESM, pooled_embedding, weights_sha256
from distill.recipes.perplexity import autocast
from distill.recipes.scale import RayOptions, check_ray, order_parts, ordered_map, shard_range

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
    causal: bool = False  # a causal teacher: one pass serves every view, and pooled embeddings are stored

    def differences(self, other: CacheKey, ignore: tuple[str, ...] = ()) -> list[str]:
        a, b = asdict(self), asdict(other)
        return [f"{k}: cache has {a[k]!r}, run has {b[k]!r}" for k in a if k not in ignore and a[k] != b[k]]


def _shard_paths(root: Path, view: int, shard: int) -> tuple[Path, Path]:
    stem = root / f"v{view:03d}-s{shard:05d}"
    return stem.with_suffix(".logits.npy"), stem.with_suffix(".offsets.npy")


def _pooled_path(root: Path, shard: int) -> Path:
    return root / f"s{shard:05d}.pooled.npy"


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


class CacheWorker:
    """The teacher's logits at the masked positions of a run of records: here, or as one Ray actor (distill.recipes.scale)."""

    def __init__(self, key: CacheKey, max_tokens: int, device: str, teacher: ESM | None = None, spec: str = "", threads: int = 0):
        if threads:
            torch.set_num_threads(threads)
        self.device = pick_device(device)
        if teacher is None:  # a Ray actor loads its own copy and proves it is the same teacher
            teacher, sha = load_teacher(spec, self.device)
            if sha != key.teacher_sha256:
                raise CacheMismatch(f"the teacher {spec} on this worker has other weights than the driver's (sha256 {sha[:12]}...)")
        self.teacher, self.key, self.max_tokens = teacher, key, max_tokens
        self._memo: tuple[tuple[int, int], dict[int, np.ndarray], np.ndarray] | None = None

    @torch.no_grad()
    def _causal_pass(self, part: data.SequenceSet) -> tuple[dict[int, np.ndarray], np.ndarray, int]:
        """A causal teacher over the unmasked records, once per run of records (the views of a shard come in a row):
        logits at every residue of the records needing no crop, and every record's pooled embedding."""
        memo_key = (int(part.keys[0]), len(part))
        if self._memo is not None and self._memo[0] == memo_key:
            return self._memo[1], self._memo[2], 0
        full, pooled, residues = {}, np.zeros((len(part), self.teacher.cfg.dim), dtype=np.float16), 0
        lengths = np.minimum(part.lengths(), tokens.MAX_RESIDUES)
        for group in tokens.token_budget_groups(lengths, np.arange(len(part)), self.max_tokens):
            toks = torch.from_numpy(tokens.pad_batch([part.seqs[i][: tokens.MAX_RESIDUES] for i in group])).to(self.device)
            with autocast(self.device):
                out = teacher_outputs(self.teacher, toks, torch.full_like(toks, data.IGNORE))
            pooled[group] = out["pooled"].float().cpu().numpy()
            for row, i in enumerate(group):
                if len(part.seqs[i]) <= tokens.MAX_RESIDUES:
                    full[i] = out["logits"][row, 1 : lengths[i] + 1].float().to(torch.float16).cpu().numpy()
            residues += int((lengths[group] + 2).sum())  # tokens with BOS and EOS, as a batch's n_real counts them
        self._memo = (memo_key, full, pooled)
        return full, pooled, residues

    @torch.no_grad()
    def run(self, item: tuple[int, data.SequenceSet]) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
        """(view, records) -> (logits [masked positions, 25] fp16, row offsets [records + 1], residues run, pooled
        embeddings [records, dim] fp16 of a causal teacher, else None)."""
        view, part = item
        per_record: dict[int, np.ndarray] = {}
        full, pooled, residues = self._causal_pass(part) if self.key.causal else ({}, None, 0)
        for i, logits in full.items():  # the view's masked positions of the one causal pass
            labels = data.masked_example(part.seqs[i], self.key.seed, view, int(part.keys[i]), self.key.mask_rate, train=True)[1]
            per_record[i] = logits[labels != data.IGNORE]
        rest = np.array([i for i in range(len(part)) if i not in full], dtype=np.int64)
        for group in tokens.token_budget_groups(part.lengths(), rest, self.max_tokens):
            examples = [
                data.masked_example(part.seqs[i], self.key.seed, view, int(part.keys[i]), self.key.mask_rate, train=True) for i in group
            ]
            batch = data.collate(examples, group)
            toks, labels = batch.tokens.to(self.device), batch.labels.to(self.device)
            with autocast(self.device):
                logits = teacher_logits(self.teacher, toks, labels).float()
            for row, i in enumerate(group):
                per_record[i] = logits[row][labels[row] != data.IGNORE].to(torch.float16).cpu().numpy()
            residues += batch.n_real
        counts = np.array([len(per_record[i]) for i in range(len(part))], dtype=np.int64)
        stacked = np.concatenate([per_record[i] for i in range(len(part))]).reshape(-1, len(tokens.RESIDUE_LETTERS))
        return stacked, np.concatenate([[0], np.cumsum(counts)]), residues, pooled


def build(
    seqs: data.SequenceSet,
    teacher: ESM | None,
    key: CacheKey,
    out: Path,
    max_tokens: int,
    device: torch.device | str,
    shard_size: int = 4096,
    quiet: bool = False,
    ray: RayOptions | None = None,
    part: tuple[int, int] | None = None,
    threads: int = 0,
) -> dict[str, Any]:
    """Run ``teacher`` over K views of ``seqs`` into ``out`` (resuming a partial build). ``ray``: the shards go to
    a Ray actor pool, each actor loading ``key.teacher`` itself. ``part`` (I, N): only the I-th of N contiguous
    ranges of shard files, for `distill merge` to join."""
    out = Path(out)
    meta_path = out / "meta.json"
    n_shards = -(-len(seqs) // shard_size)
    if meta_path.exists():
        meta = _read_meta(out)
        existing = CacheKey(**meta["key"])
        if diff := existing.differences(key):
            raise CacheMismatch(f"{out} already holds a cache for other settings ({'; '.join(diff)}); choose another -o or delete it")
        if meta.get("part", [0, 1]) != list(part or (0, 1)):
            raise CacheMismatch(f"{out} holds part {meta.get('part', [0, 1])} of a cache, not {list(part or (0, 1))}; choose another -o")
        shard_size, n_shards = meta["shard_size"], meta["n_shards"]
    out.mkdir(parents=True, exist_ok=True)
    lo, hi = shard_range(n_shards, part)
    meta = {"format": FORMAT, "version": VERSION, "key": asdict(key), "shard_size": shard_size, "n_shards": n_shards, "complete": False}
    if part is not None:
        meta |= {"part": list(part), "range": [lo, hi]}
    atomic_write_json(meta_path, meta)

    # A causal teacher's views of one shard come in a row, so its one pass over the shard serves them all.
    order = (
        [(v, s) for s in range(lo, hi) for v in range(key.views)]
        if key.causal
        else [(v, s) for v in range(key.views) for s in range(lo, hi)]
    )
    todo = [(v, s) for v, s in order if not _shard_paths(out, v, s)[1].exists()]
    console = Console(stderr=True, soft_wrap=True, quiet=quiet)
    if len(todo) < key.views * (hi - lo):
        console.print(f"resuming {out}: {key.views * (hi - lo) - len(todo)} of {key.views * (hi - lo)} shards already done")
    t0, residues = time.perf_counter(), 0
    progress = Progress(
        TextColumn("teacher cache"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console, disable=quiet
    )
    rows_of_shard = {s: np.arange(s * shard_size, min(len(seqs), (s + 1) * shard_size)) for s in range(lo, hi)}
    records = ((v, seqs.subset(rows_of_shard[s])) for v, s in todo)  # made as the workers take them
    worker = {"key": key, "max_tokens": max_tokens, "device": str(device), "threads": threads}
    worker |= {"spec": key.teacher} if ray else {"teacher": teacher}
    with progress:
        task = progress.add_task("cache", total=sum(len(rows_of_shard[s]) for _, s in todo))
        for (view, shard), (logits, offsets, n, pooled) in zip(todo, ordered_map(CacheWorker, worker, records, ray), strict=True):
            logits_path, offsets_path = _shard_paths(out, view, shard)
            if pooled is not None and not _pooled_path(out, shard).exists():
                _save_npy(_pooled_path(out, shard), pooled)  # before the shard's first offsets: a done shard has it
            _save_npy(logits_path, logits)
            _save_npy(offsets_path, offsets)  # last: marks the shard done
            residues += n
            progress.advance(task, len(offsets) - 1)
    seconds = time.perf_counter() - t0
    total_bytes = sum(p.stat().st_size for p in out.glob("*.npy"))
    per_residue = total_bytes / key.views / max(1, int(seqs.lengths()[lo * shard_size : hi * shard_size].sum()))
    meta.update(complete=True, bytes=total_bytes, bytes_per_residue_per_view=per_residue)
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
        if meta.get("part", [0, 1]) != [0, 1]:
            i, n = meta["part"]
            raise ValueError(f"{self.root} is part {i}/{n} of a teacher cache; join all {n} parts with `distill merge PARTS... -o CACHE`")
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

    def pooled(self, record_keys: list[int]) -> torch.Tensor:
        """A causal teacher's pooled embeddings [records, dim] float32, in the given order."""
        if not self.key.causal:
            raise ValueError(f"teacher cache {self.root} holds no pooled embeddings (its teacher {self.key.teacher} is not causal)")
        rows = []
        for k in record_keys:
            shard, row = divmod(int(k), self.shard_size)
            if ("pooled", shard) not in self._open:
                self._open[("pooled", shard)] = np.load(_pooled_path(self.root, shard), mmap_mode="r")
            rows.append(self._open[("pooled", shard)][row])
        return torch.from_numpy(np.stack(rows).astype(np.float32))

    def logits(self, view: int, record_keys: list[int]) -> torch.Tensor:
        """[sum of masked positions, 25] float32, records concatenated in the given order."""
        parts = []
        for k in record_keys:
            shard, row = divmod(int(k), self.shard_size)
            logits, offsets = self._shard(view % self.key.views, shard)
            parts.append(logits[offsets[row] : offsets[row + 1]])
        return torch.from_numpy(np.concatenate(parts).astype(np.float32))


def merge_parts(parts: list[Path], final: Path) -> dict[str, Any]:
    """The parts of one cache (`teacher-cache --shard I/N`) -> one cache at ``final`` that training reads as one:
    the same files a single build writes. Refuses a missing, duplicated, unfinished or foreign part."""
    final = Path(final)
    if final.exists():
        raise FileExistsError(f"{final} exists; choose another -o")
    metas = [(Path(p), _read_meta(Path(p))) for p in parts]
    first = metas[0][1]
    for path, meta in metas:
        if "part" not in meta:
            raise ValueError(f"{path} is a whole cache, not a part written with --shard I/N")
        if not meta.get("complete"):
            raise ValueError(f"{path} is unfinished; rerun its `distill teacher-cache ... --shard` command to finish it")
        same = (meta["key"], meta["shard_size"], meta["n_shards"], meta["part"][1]) == (
            first["key"], first["shard_size"], first["n_shards"], first["part"][1])  # fmt: skip
        if not same:
            raise ValueError(f"{path} is a part of another cache than {metas[0][0]} (other data, teacher, settings or N)")
    ordered = order_parts([(meta["part"][0], path) for path, meta in metas], first["part"][1], "part", "parts of the cache")
    tmp = final.with_name(final.name + ".merging")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in ordered:
        for f in sorted([*path.glob("v*-s*.npy"), *path.glob("s*.pooled.npy")]):
            try:
                os.link(f, tmp / f.name)  # same file system: no copy
            except OSError:
                shutil.copy2(f, tmp / f.name)
    total = sum(p.stat().st_size for p in tmp.glob("*.npy"))
    meta = {k: v for k, v in first.items() if k not in ("part", "range")} | {"complete": True, "bytes": total}
    meta.pop("bytes_per_residue_per_view", None)
    atomic_write_json(tmp / "meta.json", meta)
    tmp.rename(final)
    return meta


def teacher_outputs(teacher: torch.nn.Module, toks: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The teacher's ``logits`` over the 25 residue tokens at every position [batch, length, 25], its
    ``representations`` [batch, length, dim] and ``pooled`` embedding [batch, dim]. A causal teacher (UniRep) reads
    the unmasked sequence: it never sees the residue it predicts, and masks in its left context would only blur its
    prediction; a masked LM (ESM-1b) reads what the student reads."""
    if getattr(teacher, "causal", False):
        toks = torch.where(labels != data.IGNORE, labels, toks)
    out = teacher(toks)
    return {"logits": residue_logits(out["logits"]), "representations": out["representations"], "pooled": pooled_embedding(out, toks)}


def teacher_logits(teacher: torch.nn.Module, toks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return teacher_outputs(teacher, toks, labels)["logits"]


def load_teacher(spec: str, device: torch.device) -> tuple[ESM, str]:
    """Frozen teacher (eval mode, no gradients, bf16 on CUDA) and the sha256 of its weights."""
    teacher = load_any(spec)[0].eval().requires_grad_(False)  # fair-esm, Hugging Face, UniRep, or a bundle as the teacher
    if getattr(teacher, "int8", False) and device.type != "cpu":
        raise ValueError(f"{spec}: int8 UniRep runs on the CPU only (fbgemm); on {device.type} give it without +int8")
    sha = weights_sha256(teacher)
    return teacher.to(device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32), sha


def cache_key(spec: str, net: torch.nn.Module, sha: str, fasta: Path, n_records: int, mask_rate: float, seed: int, views: int) -> CacheKey:
    """The key of a cache of the loaded teacher ``net`` (``spec``, weights ``sha``) on ``fasta``."""
    return CacheKey(teacher=spec, teacher_sha256=sha, data_sha256=data.dataset_fingerprint(fasta), n_records=n_records,
                    mask_rate=mask_rate, seed=seed, views=views, causal=bool(getattr(net, "causal", False)))  # fmt: skip


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
    ray: RayOptions | None = None,
    part: tuple[int, int] | None = None,
    threads: int = 0,
) -> tuple[Path, dict[str, Any], int]:
    """`distill teacher-cache`: load DATA and the teacher, build (or resume) the cache -> (output, stats, sequences)."""
    if views < 1 or shard_size < 1:
        raise ValueError("--views and --shard-size must be at least 1")
    check_ray(ray)
    dev = pick_device("cpu" if ray else device)  # on Ray the driver only fingerprints the teacher; actors pick their device
    seqs = data.load_fasta(fasta)
    net, sha = load_teacher(teacher, dev)
    key = cache_key(teacher, net, sha, fasta, len(seqs), mask_rate, seed, views)
    if ray is not None:
        del net
        return output, build(seqs, None, key, output, max_tokens, device, shard_size, quiet, ray, part), len(seqs)
    return output, build(seqs, net, key, output, max_tokens, dev, shard_size, quiet, ray, part, threads), len(seqs)
