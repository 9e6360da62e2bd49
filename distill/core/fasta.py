"""Streaming FASTA reader: one record in memory at a time, multi-line records, ``.gz`` too.

Sequences are upper-cased and must use the 25 residue letters of the ESM alphabet. Problems are
reported with the file, the record id and the line number. ``iter_records`` yields every record
with an ``error`` field (so batch annotation can write an error row and go on); ``read_fasta``
raises on the first bad record (what training wants).
"""

from __future__ import annotations

import gzip
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from distill.core import tokens


class FastaError(ValueError):
    """A malformed FASTA file or record; the message names file, record and line."""


class DuplicateIdWarning(UserWarning):
    pass


@dataclass(frozen=True)
class Record:
    id: str
    description: str
    sequence: str
    line: int  # 1-based line number of the header
    error: str | None = None


def open_text(path: Path) -> io.TextIOBase:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FASTA file {path} does not exist")
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if gzipped:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _check(path: Path, rid: str, header_line: int, lines: list[tuple[int, str]]) -> tuple[str, str | None]:
    seq = "".join(s for _, s in lines)
    if not seq:
        return seq, f"{path}: record {rid!r} (line {header_line}) has an empty sequence"
    bad = tokens.illegal_position(seq)
    if bad is None:
        return seq, None
    # Map the offset back to the line it came from, so the user can find it in an editor.
    offset = bad
    for lineno, chunk in lines:
        if offset < len(chunk):
            return seq, (
                f"{path}: record {rid!r} line {lineno} column {offset + 1}: illegal residue {seq[bad]!r} "
                f"(residue {bad + 1}); allowed are the 25 letters {tokens.RESIDUE_LETTERS}"
            )
        offset -= len(chunk)
    raise AssertionError("unreachable")


def iter_records(path: Path, warn_duplicates: bool = True) -> Iterator[Record]:
    """Every record of ``path`` in file order, each with ``error=None`` or a message."""
    path = Path(path)
    seen: set[str] = set()
    rid = desc = None
    header_line = 0
    lines: list[tuple[int, str]] = []

    def finish() -> Record:
        seq, error = _check(path, rid, header_line, lines)
        if warn_duplicates:
            if rid in seen:
                warnings.warn(f"{path}: duplicate record id {rid!r} (line {header_line})", DuplicateIdWarning, stacklevel=3)
            seen.add(rid)
        return Record(rid, desc, seq, header_line, error)

    skipping = False  # inside residue lines whose missing header was already reported
    with open_text(path) as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if line.startswith(">"):
                if rid is not None:
                    yield finish()
                header_line, lines, skipping = lineno, [], False
                rid, _, desc = line[1:].strip().partition(" ")
                desc = desc.strip()
                if not rid:
                    yield Record(f"<no id, line {lineno}>", "", "", lineno, f"{path}: line {lineno}: header '>' has no record id")
                    rid, skipping = None, True
            elif line and rid is not None:
                lines.append((lineno, tokens.ascii_upper(line).replace(" ", "")))
            elif line and not skipping:
                yield Record(
                    f"<no header, line {lineno}>",
                    "",
                    "",
                    lineno,
                    f"{path}: line {lineno}: sequence data with no '>' header before it",
                )
                skipping = True
        if rid is not None:
            yield finish()


def read_fasta(path: Path) -> Iterator[Record]:
    """Valid records only; the first bad record raises ``FastaError``."""
    for record in iter_records(path):
        if record.error:
            raise FastaError(record.error)
        yield record


def read_proteome(path: Path, option: str = "--background") -> tuple[str, list[str]]:
    """A whole proteome given as ``option``: its file name and protein sequences (a bad record is an error naming it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option} {path} does not exist")
    sequences = [r.sequence for r in read_fasta(path)]
    if not sequences:
        raise ValueError(f"{option} {path} holds no FASTA records")
    return path.name, sequences


def count_records(path: Path) -> int:
    """Fast pre-count (header lines) for progress bars."""
    with open_text(path) as f:
        return sum(1 for line in f if line.startswith(">"))
