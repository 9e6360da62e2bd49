"""`distill merge`: the outputs of `distill annotate --shard I/N` runs -> the single-process output, or a clear refusal.

Every shard's progress file records the job (input file and settings, the shard left out), its shard number and its
record range. Merging refuses a missing, duplicated, unfinished or foreign shard (another input, model or setting),
then concatenates the TSVs (one header) and the embeddings in shard order: byte-identical to an unsharded run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from distill.core.io import atomic_path, atomic_write_json, read_json_object
from distill.recipes.annotate_columns import domains_path
from distill.recipes.scale import order_parts

EMBEDDING_READERS = (".npy", ".parquet", ".h5", ".hdf5")


def _state(output: Path) -> dict[str, Any]:
    progress = output.with_name(output.name + ".progress.json")
    if not progress.is_file():
        raise FileNotFoundError(f"{output} has no progress file {progress}: not an output of `distill annotate`")
    state = read_json_object(progress, "annotate progress file")
    if not state.get("complete"):
        raise ValueError(
            f"{output} is unfinished ({state.get('records', 0)} records so far); finish it with `distill annotate ... --resume`"
        )
    if "job" not in state.get("settings", {}):
        raise ValueError(f"{output} was written without --shard support (an older esm-distill); rerun that shard")
    return state


def check_shards(outputs: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """The outputs in shard order, after checking that they are exactly shards 0..N-1 of one job."""
    states = [(Path(o), _state(Path(o))) for o in outputs]
    jobs = {s["settings"]["job"] for _, s in states}
    if len(jobs) > 1:
        first = states[0][0]
        foreign = next(o for o, s in states if s["settings"]["job"] != states[0][1]["settings"]["job"])
        raise ValueError(
            f"{foreign} belongs to another job than {first} (other input file, model or settings); merge shards of one job only"
        )
    counts = {s["settings"]["shard"][1] for _, s in states}
    if len(counts) > 1:
        raise ValueError(f"the outputs were cut into different numbers of shards ({sorted(counts)})")
    ordered = order_parts([(s["settings"]["shard"][0], o) for o, s in states], counts.pop(), "shard", "outputs of the job")
    state_of = dict(states)
    return [(o, state_of[o]) for o in ordered]


def merge(outputs: list[Path], final: Path, embeddings: Path | None = None) -> dict[str, Any]:
    """Write ``final`` (and ``embeddings``) from the shards; returns the merged progress record."""
    final = Path(final)
    if final.exists():
        raise FileExistsError(f"{final} exists; choose another -o")
    shards = check_shards(outputs)
    tables = [(final, [o for o, _ in shards])]
    if shards[0][1]["settings"].get("domains"):  # each shard wrote a domain table beside its TSV
        tables.append((domains_path(final), [domains_path(o) for o, _ in shards]))
    for target, sources in tables:
        with atomic_path(target) as tmp, open(tmp, "wb") as out:
            for k, source in enumerate(sources):
                with open(source, "rb") as f:
                    header = f.readline()
                    if k == 0:
                        out.write(header)
                    shutil.copyfileobj(f, out)
    if embeddings is not None:
        _merge_embeddings([Path(s["settings"]["embeddings"]) for _, s in shards], Path(embeddings))
    total = {k: sum(s[k] for _, s in shards) for k in ("records", "ok", "errors", "residues")}
    state = {"job": shards[0][1]["settings"]["job"], "merged_from": [str(o) for o, _ in shards], "complete": True, **total}
    atomic_write_json(final.with_name(final.name + ".progress.json"), state)
    return state


def _merge_embeddings(parts: list[Path], final: Path) -> None:
    if any(not str(p) for p in parts) or any(not p.is_file() for p in parts):
        raise ValueError("--embeddings needs every shard to have written embeddings (annotate --embeddings ...)")
    suffix = final.suffix.lower()
    if suffix not in EMBEDDING_READERS or any(p.suffix.lower() != suffix for p in parts):
        raise ValueError(
            f"--embeddings {final}: the shards' embeddings are {sorted({p.suffix for p in parts})}; merge into the same format"
        )
    with atomic_path(final) as tmp:
        if suffix == ".npy":
            with open(tmp, "wb") as f:  # through a handle: given a path, numpy would append .npy to the temporary name
                np.save(f, np.concatenate([np.load(p) for p in parts]))
            ids = "".join(p.with_name(p.name.removesuffix(".npy") + ".ids.txt").read_text() for p in parts)
            with atomic_path(final.with_name(final.name.removesuffix(".npy") + ".ids.txt")) as ids_tmp:
                ids_tmp.write_text(ids)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq  # each container's library only when it is used

            tables = [pq.read_table(p) for p in parts]
            with pq.ParquetWriter(tmp, tables[0].schema) as w:
                for t in tables:
                    w.write_table(t)
        else:
            import h5py

            with h5py.File(tmp, "w") as out:
                for p in parts:
                    with h5py.File(p, "r") as f:
                        out.attrs["esm_distill"] = json.dumps(json.loads(f.attrs["esm_distill"]))
                        for name in f:
                            f.copy(f[name], out, name)
