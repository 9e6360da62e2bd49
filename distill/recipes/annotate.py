"""`distill annotate`: a FASTA of any size -> one TSV row per record (+ embeddings), streaming and resumable.

Data flow: FASTA records (streamed, bad records become error rows) -> chunks of ``chunk_records`` records ->
valid sequences -> the inference layer (``distill.inference``: over-long ones cut into overlapping windows or
cropped, token-budget batches length-sorted inside the chunk, over ONNX Runtime, torch, or the BentoML service
over HTTP) -> rows written in input order.

Crash safety: a chunk's rows are appended to the TSV and its embeddings saved as one shard file, both
flushed to disk, and only then ``OUT.progress.json`` is replaced (atomically) with the new record count and
TSV byte length. ``--resume`` truncates the TSV to the recorded length (dropping any half-written chunk),
drops shards past it, skips the recorded records and carries on. The embeddings container (HDF5, Parquet or
.npy) is assembled from the shards at the end, so a kill never corrupts it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distill.core.config import ANNOTATE
from distill.core.fasta import count_records, iter_records
from distill.core.io import atomic_path, atomic_write, atomic_write_json, read_json_object
from distill.inference import Inference
from distill.inference.index import load_index
from distill.inference.layer import raised_thresholds
from distill.inference.scan import Scan, scan
from distill.inference.sequences import long_note
from distill.recipes.annotate_columns import Columns, domains_path
from distill.recipes.scale import RayOptions, check_ray, ordered_map, shard_range

LONG_POLICIES = ("windows", "crop")  # annotate never refuses a long record (no "error"): nothing is dropped
EMBEDDING_SUFFIXES = (".h5", ".hdf5", ".parquet", ".npy")


@dataclass
class Row:
    id: str
    length: int
    status: str  # ok | error
    message: str
    embedding: np.ndarray | None = None
    probabilities: dict[str, np.ndarray] | None = None
    sequence: str = ""  # kept for the reference index's alignment re-ranking
    scans: dict[str, Scan] | None = None  # per scanning task: the head over the protein's windows


def annotate_chunk(records: list, inference: Inference, tasks: list[str], long_policy: str, scanning: tuple[str, ...] = ()) -> list[Row]:
    """Rows for one chunk of FASTA records, in input order; the inference layer batches, crops or windows. A
    scanning head's probabilities are each label's best window (distill.inference.scan)."""
    rows = [
        Row(r.id, len(r.sequence), "error", r.error)
        if r.error
        else Row(r.id, len(r.sequence), "ok", long_note(len(r.sequence), long_policy), sequence=r.sequence)
        for r in records
    ]
    ok = [r for r in rows if r.status == "ok"]
    if ok:
        for row, e in zip(ok, inference.embed([r.sequence for r in ok], long_policy, tasks=tasks), strict=True):
            row.embedding, row.probabilities, row.scans = e.sequence, e.probabilities, {}
        for t in scanning:
            for row, s in zip(ok, scan(inference, [r.sequence for r in ok], t, *inference.scan_of(t)), strict=True):
                row.scans[t], row.probabilities[t] = s, s.best
    return rows


def _fingerprint(input_path: Path, settings: dict[str, Any]) -> str:
    st = input_path.stat()
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(f"{input_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _chunks(path: Path, size: int, skip: int, stop: int | None) -> Iterator[list]:
    chunk = []
    for n, record in enumerate(iter_records(path, warn_duplicates=False)):
        if n < skip:
            continue
        if stop is not None and n >= stop:
            break
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class Summary:
    records: int
    ok: int
    errors: int
    seconds: float
    residues: int
    output: Path
    embeddings: Path | None


@dataclass
class Options:
    """What ``distill annotate`` was asked for, besides input, model and output."""

    tasks: list[str] | None = None
    top_k: int = ANNOTATE.top_k
    embeddings: Path | None = None
    long_policy: str = ANNOTATE.long_policy
    resume: bool = False
    chunk_records: int = ANNOTATE.chunk_records
    quiet: bool = False
    min_probability: float | None = None  # overrides every head's calibrated threshold
    reference: Path | None = None  # a `distill index` directory: nearest references beside the calls
    reference_k: int = ANNOTATE.reference_k
    shard: tuple[int, int] | None = None  # (I, N): this run handles the I-th of N contiguous record ranges (0-based)


def columns_for(model: Inference, opts: Options) -> Columns:
    """Check the options against the backend (heads, top-k, the reference index's model) -> the TSV's columns."""
    if opts.long_policy not in LONG_POLICIES:
        raise ValueError(f"--long must be one of {', '.join(LONG_POLICIES)}, got {opts.long_policy!r}")
    if opts.top_k < 1 or opts.reference_k < 1:
        raise ValueError(f"--top-k and --reference-k must be at least 1, got {opts.top_k} and {opts.reference_k}")
    if opts.min_probability is not None and not 0 <= opts.min_probability <= 1:
        raise ValueError(f"--min-probability must be in [0, 1], got {opts.min_probability}")
    tasks = list(model.labels) if opts.tasks is None else opts.tasks
    missing = [t for t in tasks if t not in model.labels]
    if missing:
        raise ValueError(
            f"the model has no {', '.join(missing)} head (heads: {', '.join(model.labels) or 'none'}); add one with `distill probe`"
        )
    if opts.top_k > min((len(model.labels[t]) for t in tasks), default=opts.top_k):
        raise ValueError(f"--top-k {opts.top_k} exceeds the number of labels of a head")
    if opts.embeddings is not None and not str(opts.embeddings).endswith(EMBEDDING_SUFFIXES):
        raise ValueError(f"--embeddings must end in one of {', '.join(EMBEDDING_SUFFIXES)}: {opts.embeddings}")
    thresholds = {t: opts.min_probability if opts.min_probability is not None else model.thresholds.get(t, 0.0) for t in tasks}
    raised = {t: raised_thresholds(model.calibrations.get(t, {})) for t in tasks} if opts.min_probability is None else {}
    reference = None
    if opts.reference is not None:
        reference = load_index(opts.reference)
        reference.check_model(lambda seqs: model.run(seqs, [])[0])
    scanning = tuple(t for t in tasks if model.scan_of(t))
    return Columns(tasks, model.labels, opts.top_k, thresholds, reference, min(opts.reference_k, len(reference or [0])), raised, scanning)


@dataclass
class ChunkOut:
    """What one chunk adds to the outputs: its TSV rows, its domain rows, the embeddings of its ok rows, counts."""

    text: str
    domains: str
    ids: list[str]
    vectors: np.ndarray
    records: int
    ok: int
    residues: int


class ChunkWorker:
    """Annotates chunks with one loaded model: in this process, or as one Ray actor of many (distill.recipes.scale)."""

    def __init__(self, load: Callable[..., Inference], opts: Options, threads: int = 0):
        self.model = load(threads=threads)
        self.cols = columns_for(self.model, opts)
        self.opts = opts

    def run(self, chunk: list) -> ChunkOut:
        rows = annotate_chunk(chunk, self.model, self.cols.tasks, self.opts.long_policy, self.cols.scanning)
        ok = [r for r in rows if r.status == "ok"]
        vectors = np.zeros((0, self.model.dim), np.float32)
        if self.opts.embeddings is not None and ok:
            vectors = np.stack([r.embedding for r in ok]).astype(np.float32)
        return ChunkOut(*self.cols.rows(rows), [r.id for r in ok], vectors, len(rows), len(ok), sum(r.length for r in ok))


def _start(input_path: Path, output: Path, opts: Options, cols: Columns, fingerprint: str, settings: dict, console: Console) -> dict | None:
    """A fresh run (header written) or the resumed state; None when the output is already complete."""
    progress_path, parts = _progress_path(output), output.with_name(output.name + ".parts")
    done = {"records": 0, "bytes": 0, "domain_bytes": 0, "chunks": 0, "ok": 0, "errors": 0, "residues": 0}
    if opts.resume and not progress_path.is_file() and output.exists():
        raise FileExistsError(f"{output} exists but has no progress file {progress_path}, so it was not written by a resumable run")
    if opts.resume and progress_path.is_file():
        state = read_json_object(progress_path, "annotate progress file")
        if state.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{progress_path} belongs to a different run (input file, model or settings changed); "
                f"remove {output} and {progress_path} to start over"
            )
        if state.get("complete"):
            console.print(f"{output} is already complete ({state['records']} records); nothing to do")
            return None
        done = {k: state[k] for k in done}
        with open(output, "r+b") as f:
            f.truncate(done["bytes"])  # anything after the last recorded chunk is a half-written chunk
        if cols.domains:
            with open(domains_path(output), "r+b") as f:
                f.truncate(done["domain_bytes"])
        for shard in parts.glob("chunk-*.npz") if parts.is_dir() else []:
            if int(shard.stem.split("-")[1]) >= done["chunks"]:
                shard.unlink()
        console.print(f"resuming {output} after {done['records']} records")
        return done
    if output.exists() or progress_path.exists():
        what = output if output.exists() else f"an annotation into {output} ({progress_path.name})"
        raise FileExistsError(f"{what} exists; continue it with --resume or choose another -o")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(cols.header())
    done["bytes"] = output.stat().st_size
    if cols.domains:
        domains_path(output).write_text(cols.domain_header())
        done["domain_bytes"] = domains_path(output).stat().st_size
    shutil.rmtree(parts, ignore_errors=True)
    atomic_write_json(progress_path, {"fingerprint": fingerprint, "settings": settings, "complete": False, **done})
    return done


def _progress_path(output: Path) -> Path:
    return output.with_name(output.name + ".progress.json")


def annotate(
    input_path: Path, model: Inference, output: Path, opts: Options | None = None, console: Console | None = None,
    ray: RayOptions | None = None, load: Callable[..., Inference] | None = None,
) -> Summary:  # fmt: skip
    """Annotate ``input_path`` into ``output``; with ``ray``, chunks go to a Ray actor pool, each actor calling
    ``load(threads=...)`` for its own copy of ``model``. The bytes written are the same either way."""
    opts = opts or Options()
    console = console or Console(stderr=True, soft_wrap=True)
    input_path, output = Path(input_path), Path(output)
    if not input_path.is_file():
        raise FileNotFoundError(f"input FASTA {input_path} does not exist")
    if ray is not None and load is None:
        raise ValueError("annotate on Ray needs a loader for the workers' models")
    check_ray(ray)
    cols = columns_for(model, opts)
    total = count_records(input_path)
    if total == 0:
        raise ValueError(f"{input_path} holds no FASTA records; nothing to annotate")
    if opts.shard is not None:  # ranges in the reader's own numbering (the fast pre-count sees only '>' lines)
        total = sum(1 for _ in iter_records(input_path, warn_duplicates=False))
    lo, hi = shard_range(total, opts.shard)
    settings = {"model": model.name, "tasks": cols.tasks, "top_k": opts.top_k, "long": opts.long_policy, "chunk": opts.chunk_records,
                "thresholds": cols.thresholds, "label_thresholds": cols.label_thresholds, "scanning": list(cols.scanning), "reference": str(opts.reference or ""), "reference_k": cols.reference_k,
                "domains": cols.domains}  # fmt: skip
    job = _fingerprint(input_path, settings)  # what every shard of one job shares: `distill merge` checks it
    settings |= {"embeddings": str(opts.embeddings or ""), "shard": list(opts.shard or (0, 1)), "range": [lo, hi], "job": job}
    fingerprint = _fingerprint(input_path, settings)
    done = _start(input_path, output, opts, cols, fingerprint, settings, console)
    if done is None:
        state = read_json_object(_progress_path(output), "annotate progress file")
        return Summary(state["records"], state["ok"], state["errors"], 0.0, state["residues"], output, opts.embeddings)
    parts = output.with_name(output.name + ".parts")
    if opts.embeddings is not None:
        parts.mkdir(exist_ok=True)
    start = time.perf_counter()
    columns = [TextColumn("annotating"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[sps]:,.0f} seq/s  {task.fields[rps]:,.0f} res/s"), TimeRemainingColumn()]  # fmt: skip
    new_residues = 0
    chunks = _chunks(input_path, opts.chunk_records, lo + done["records"], hi if opts.shard else None)
    worker = {"load": (lambda threads=0: model) if ray is None else load, "opts": opts}
    with (
        Progress(*columns, console=console, disable=opts.quiet) as bar,
        open(output, "ab") as out,
        open(domains_path(output) if cols.domains else os.devnull, "ab") as dom,
    ):
        task = bar.add_task("annotate", total=hi - lo, completed=done["records"], sps=0.0, rps=0.0)
        for result in ordered_map(ChunkWorker, worker, chunks, ray):
            if opts.embeddings is not None:
                _save_shard(parts / f"chunk-{done['chunks']:08d}.npz", result.ids, result.vectors)
            for f, text in ((out, result.text), (dom, result.domains)) if cols.domains else ((out, result.text),):
                f.write(text.encode())
                f.flush()
                os.fsync(f.fileno())
            new_residues += result.residues
            done = {"records": done["records"] + result.records, "bytes": out.tell(), "domain_bytes": dom.tell() if cols.domains else 0,
                    "chunks": done["chunks"] + 1,
                    "ok": done["ok"] + result.ok, "errors": done["errors"] + result.records - result.ok,
                    "residues": done["residues"] + result.residues}  # fmt: skip
            atomic_write_json(_progress_path(output), {"fingerprint": fingerprint, "settings": settings, "complete": False, **done})
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.update(task, completed=done["records"], sps=done["records"] / elapsed, rps=new_residues / elapsed)
    if opts.embeddings is not None:
        write_embeddings(parts, opts.embeddings, model, done["chunks"], done["ok"])
        shutil.rmtree(parts, ignore_errors=True)
    atomic_write_json(_progress_path(output), {"fingerprint": fingerprint, "settings": settings, "complete": True, **done})
    return Summary(done["records"], done["ok"], done["errors"], time.perf_counter() - start, done["residues"], output, opts.embeddings)


def _save_shard(path: Path, ids: list[str], vectors: np.ndarray) -> None:
    """One chunk's embeddings: ids + a float32 matrix, written atomically."""

    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, ids=np.array(ids, dtype=str), vectors=vectors)

    atomic_write(path, write)


def _shards(parts: Path, n: int) -> Iterator[tuple[list[str], np.ndarray]]:
    for i in range(n):
        with np.load(parts / f"chunk-{i:08d}.npz") as z:
            yield [str(x) for x in z["ids"]], z["vectors"]


def write_embeddings(parts: Path, path: Path, model: Inference, n_chunks: int, n_rows: int) -> None:
    """Assemble the shards into the requested container, atomically, carrying the model's metadata."""

    meta = {"model": model.name, "dim": model.dim, "pooling": "mean", **{k: v for k, v in model.metadata.items() if k != "labels"}}
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix in (".h5", ".hdf5"):
            import h5py  # each container's library only when it is asked for

            with h5py.File(tmp, "w") as f:  # one dataset per id, as bio_embeddings writes them
                f.attrs["esm_distill"] = json.dumps(meta, default=str)
                for ids, vectors in _shards(parts, n_chunks):
                    for rid, v in zip(ids, vectors, strict=True):
                        name = rid.replace("/", "%2F")  # '/' would make HDF5 groups
                        ds = f.create_dataset(name, data=v)
                        ds.attrs["original_id"] = rid
        elif suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema(
                [("id", pa.string()), ("embedding", pa.list_(pa.float32(), model.dim))],
                metadata={"esm_distill": json.dumps(meta, default=str)},
            )
            with pq.ParquetWriter(tmp, schema) as w:
                for ids, vectors in _shards(parts, n_chunks):
                    emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), model.dim)
                    w.write_table(pa.Table.from_arrays([pa.array(ids, pa.string()), emb], schema=schema))
        else:  # .npy: a [records, dim] matrix; ids in PATH.ids.txt (same order)
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_rows, model.dim))
            row = 0
            id_lines = []
            for ids, vectors in _shards(parts, n_chunks):
                arr[row : row + len(ids)] = vectors
                row += len(ids)
                id_lines += ids
            arr.flush()
            del arr
            ids_path = path.with_name(path.name.removesuffix(".npy") + ".ids.txt")
            with atomic_path(ids_path) as ids_tmp:
                ids_tmp.write_text("".join(x + "\n" for x in id_lines))
