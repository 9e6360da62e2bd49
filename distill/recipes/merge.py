"""`distill merge`: one registry of the sharded jobs and how each joins its parts.

A job run as ``--shard I/N`` (distill.recipes.scale) writes parts that only its own recipe knows how to join. Each
kind registers here how its parts are recognised and merged; the command asks the registry, so a new sharded job
adds one entry, not a branch in the CLI. (``distill sweep --merge`` joins a grid's stages, not the shards of one
job: it stays with the sweep.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Job:
    kind: str
    is_part: Callable[[Path], bool]
    merge: Callable[[list[Path], Path, Path | None], str]  # (parts, output, embeddings) -> the summary line


def _teacher_cache(parts: list[Path], output: Path, embeddings: Path | None) -> str:
    from distill.recipes.teacher_cache import merge_parts

    meta = merge_parts(parts, output)
    return f"merged {len(parts)} parts: teacher cache {output}, {meta['n_shards']} shard files x {meta['key']['views']} view(s)"


def _index(parts: list[Path], output: Path, embeddings: Path | None) -> str:
    from distill.recipes.index_build import merge_parts

    return f"merged {len(parts)} parts: index {output}, {len(merge_parts(parts, output))} references"


def _annotate(parts: list[Path], output: Path, embeddings: Path | None) -> str:
    from distill.recipes.annotate_merge import merge

    s = merge(parts, output, embeddings)
    return f"merged {len(s['merged_from'])} shards: {s['records']} records ({s['ok']} ok, {s['errors']} error) -> {output}"


def _is_index_part(p: Path) -> bool:
    from distill.inference.index import PART_FILE

    return (p / PART_FILE).is_file()


JOBS = (
    Job("teacher-cache", lambda p: (p / "meta.json").is_file(), _teacher_cache),
    Job("index", _is_index_part, _index),
    Job("annotate", lambda p: p.is_file() or not p.exists(), _annotate),  # TSVs; a missing one is annotate_merge's to name
)


def merge_job(parts: list[Path], output: Path, embeddings: Path | None = None) -> str:
    """Join the parts of one sharded job (every part of one kind); returns what was merged, in one line."""
    kinds = [next((j for j in JOBS if j.is_part(Path(p))), None) for p in parts]
    if None in kinds:
        bad = parts[kinds.index(None)]
        raise ValueError(f"{bad} is a directory but not a part of a sharded job (a teacher-cache part or an index part)")
    if len({j.kind for j in kinds}) > 1:
        raise ValueError(f"the parts mix job kinds ({', '.join(sorted({j.kind for j in kinds}))}); merge the parts of one job")
    if embeddings is not None and kinds[0].kind != "annotate":
        raise ValueError(f"--embeddings is for annotate parts, not {kinds[0].kind} parts")
    return kinds[0].merge([Path(p) for p in parts], Path(output), embeddings)
