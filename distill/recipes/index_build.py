"""``distill index``: read labelled references, embed them with the model, build or extend the index."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distill.core.config import DEFAULT_MAX_EVALUE, POOLINGS
from distill.core.distributed import pick_device
from distill.core.fasta import read_proteome
from distill.core.heads import heads_of
from distill.core.io import atomic_path, atomic_write_json, read_json_object
from distill.core.labels import read_labelled
from distill.core.model import ESM
from distill.inference import kmers
from distill.inference.embeddings import embed
from distill.inference.encoders import load_encoder
from distill.inference.index import PART_FILE, ReferenceIndex, load_index
from distill.inference.index_calibration import build_index
from distill.recipes.scale import RayOptions, check_ray, order_parts, ordered_map, shard_range

CHUNK = 1024  # references per embedding call: the unit of Ray tasks and of --shard ranges


def default_pooling(spec: str) -> str:
    """A fine-tuned bundle's head pooling (its embedding space is what the head was trained on), else mean."""
    if Path(spec).is_dir():
        heads = heads_of(Path(spec))
        fine = [h for h in heads.values() if h.card.get("protocol", {}).get("kind") == "fine-tuned"]
        if fine:
            return fine[0].pooling
    return "mean"


class EmbedWorker:
    """Pooled embeddings of one chunk of references: here, or as one Ray actor (distill.recipes.scale)."""

    def __init__(self, pooling: str, max_tokens: int, device: str, net: ESM | None = None, spec: str = "", threads: int = 0):
        if threads:
            torch.set_num_threads(threads)
        self.device = str(pick_device(device))
        self.net = (net if net is not None else load_encoder(spec).model).eval().to(self.device)
        self.pooling, self.max_tokens = pooling, max_tokens

    def run(self, sequences: list[str]) -> np.ndarray:
        return embed(self.net, sequences, self.pooling, self.max_tokens, self.device)


def embed_chunks(worker: dict[str, Any], sequences: list[str], ray: RayOptions | None, label: str = "embedding") -> np.ndarray:
    """[n, dim] vectors, the sequences cut into chunks of ``CHUNK`` the same way in every mode (so the same bytes)."""
    chunks = [sequences[i : i + CHUNK] for i in range(0, len(sequences), CHUNK)]
    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    out = []
    with Progress(*columns, transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=len(sequences))
        for vectors in ordered_map(EmbedWorker, worker, chunks, ray):
            out.append(vectors)
            bar.advance(task, len(vectors))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def index_command(
    model: str, data: list[str], task: str, output: Path, append: bool, labels: Path | None, pooling: str,
    target: float, max_tokens: int, device: str, console: Console, align: int = 0,
    ray: RayOptions | None = None, part: tuple[int, int] | None = None, threads: int = 0, kmer: bool = True,
    background: Path | None = None, max_evalue: float = DEFAULT_MAX_EVALUE,
) -> ReferenceIndex | Path:  # fmt: skip
    """Build (or --append to) the index at ``output``; with ``part`` (I, N), embed only the I-th of N contiguous
    chunk ranges into a part directory for `distill merge` (which calibrates the whole index)."""
    pooling = pooling or default_pooling(model)
    if pooling not in POOLINGS:
        raise ValueError(f"--pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if align < 0:
        raise ValueError(f"--align must be 0 (cosine calls) or a number of candidates to align, got {align}")
    check_ray(ray)
    if part is not None and append:
        raise ValueError("--shard builds a part of a new index; append to a merged index with --append, unsharded")
    if not 0 < max_evalue <= 1000:
        raise ValueError(f"--max-evalue must be in (0, 1000], got {max_evalue}")
    if background is not None and not align:
        raise ValueError("--background calibrates alignment calls per label: add --align N (e.g. --align 200)")
    proteome = read_proteome(background) if background is not None else None
    previous = load_index(output) if append else None
    if not append and (Path(output) / "index.json").exists():
        raise FileExistsError(f"{output} holds an index; add to it with --append or choose another -o")
    if previous is not None and previous.card["pooling"] != pooling:
        raise ValueError(f"the index at {output} holds {previous.card['pooling']}-pooled embeddings; --pooling {pooling} would mix spaces")
    if previous is not None and align and align != previous.align:
        raise ValueError(
            f"the index at {output} re-ranks {previous.align} candidates; --align {align} would change its calls (leave it out)"
        )
    ds = read_labelled(data, task, labels)
    encoder = load_encoder(model)
    net = encoder.model.eval()
    worker = {"pooling": pooling, "max_tokens": max_tokens, "device": device, "threads": threads} | (
        {"spec": model} if ray else {"net": net}
    )
    card = _card(model, encoder.fingerprint, pooling, net.cfg.dim, task, align, kmers.K if align and kmer else 0)
    if part is not None:
        return _write_part(output, part, ds, worker, ray, card, {"data": [str(d) for d in data], "labels": str(labels or ""),
                           "target": target, "max_tokens": max_tokens, "device": device,
                           "background": str(background or ""), "max_evalue": max_evalue})  # fmt: skip
    console.print(f"indexing {len(ds)} {task} references with {encoder.name} ({pooling} pooling)")
    if proteome is not None:
        console.print(f"calibrating each label against the {len(proteome[1])} proteins of the background {proteome[0]}")
    index = build_index(lambda seqs: embed_chunks(worker, seqs, ray), ds.ids, ds.sequences, ds.labels, card, previous, target,
                        background=proteome, max_evalue=max_evalue)  # fmt: skip
    index.save(output)
    return index


def _card(model: str, fingerprint: str, pooling: str, dim: int, task: str, align: int, kmer: int | None = None) -> dict[str, Any]:
    """``kmer`` (k, or 0): an aligning index also draws candidates from shared k-mers (distill.inference.kmers); older cards lack it."""
    card = {"model": model, "fingerprint": fingerprint, "pooling": pooling, "dim": dim, "task": task, "align": align}
    return card | {"kmer": kmer if kmer is not None else 0}


def _write_part(output: Path, part: tuple[int, int], ds: Any, worker: dict, ray: RayOptions | None, card: dict, args: dict) -> Path:
    """Part I of N: the vectors of its chunks and what `distill merge` needs to check and finish the index."""
    output = Path(output)
    n_chunks = -(-len(ds) // CHUNK)
    lo, hi = (x * CHUNK for x in shard_range(n_chunks, part))
    hi = min(hi, len(ds))
    if (output / PART_FILE).is_file():
        raise FileExistsError(f"{output} holds an index part; choose another -o")
    job = {"card": card, **args, "records": len(ds), "ids_sha256": hashlib.sha256("\n".join(ds.ids).encode()).hexdigest()}
    vectors = embed_chunks(worker, ds.sequences[lo:hi], ray, f"embedding part {part[0]}/{part[1]}")
    output.mkdir(parents=True, exist_ok=True)
    with atomic_path(output / "vectors.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, vectors.reshape(hi - lo, card["dim"]).astype(np.float32))
    atomic_write_json(output / PART_FILE, {"job": job, "part": list(part), "range": [lo, hi]})  # last: marks the part done
    return output


def merge_parts(parts: list[Path], final: Path) -> ReferenceIndex:
    """The parts of one `distill index --shard I/N` job -> the index one unsharded run builds (calibrated here)."""
    states = [(Path(p), read_json_object(Path(p) / PART_FILE, "index part")) for p in parts]
    job = states[0][1]["job"]
    for path, state in states:
        if state["job"] != job:
            raise ValueError(f"{path} is a part of another index job than {states[0][0]} (other model, data or settings)")
    ordered = order_parts([(state["part"][0], path) for path, state in states], states[0][1]["part"][1], "part", "parts of the index")
    if (Path(final) / "index.json").exists():
        raise FileExistsError(f"{final} holds an index; choose another -o")
    card = _card(**job["card"])  # the key order of an unsharded build's card: the same bytes
    ds = read_labelled(job["data"], card["task"], Path(job["labels"]) if job["labels"] else None)
    if len(ds) != job["records"]:
        raise ValueError(f"the labelled data now has {len(ds)} records, the parts were built from {job['records']}; rebuild them")
    vectors = np.concatenate([np.load(path / "vectors.npy") for path in ordered])
    net = load_encoder(card["model"]).model.eval()
    worker = {"pooling": card["pooling"], "max_tokens": job["max_tokens"], "device": job["device"], "net": net}
    proteome = read_proteome(Path(job["background"])) if job.get("background") else None
    index = build_index(lambda seqs: embed_chunks(worker, seqs, None), ds.ids, ds.sequences, ds.labels, card, None, job["target"],
                        vectors=vectors, background=proteome, max_evalue=job.get("max_evalue", DEFAULT_MAX_EVALUE))  # fmt: skip
    index.save(final)
    return index
