"""Labelled protein sets for probing and fine-tuning: FASTA with the label in the header, Stockholm, or TSV.

Formats (chosen by content, not by file name):
  FASTA                 the label is a field of the header: ``>ID LABEL ...`` (``label_field`` 1, the default) or
                        what ``label_regex``'s first group matches in the header's description
  Stockholm             one family per file, label from ``#=GF AC``; gaps stripped, residues upper-cased
  TSV                   ``id<TAB>label<TAB>sequence`` (a ``#`` line or a header row ``id label sequence`` is skipped)

Tasks: any name (letters, digits, _; it becomes the ``<task>_probabilities`` ONNX output and ``<task>_label_k``
TSV columns). Labels are kept as written, except for two presets that know their formats:
  pfam    a Pfam accession: ``PF00041`` or ``PF00041.20`` -> ``PF00041``
  scope   a SCOPe sccs ``a.1.1.1`` cut at ``level``: class ``a``, fold ``a.1``, superfamily ``a.1.1`` (default) or
          family ``a.1.1.1``; the full sccs is kept as the group for family- and superfamily-holdout splits
"""

from __future__ import annotations

import glob
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distill.core import tokens
from distill.core.fasta import iter_records, open_text

PRESET_TASKS = ("pfam", "scope")
SCOPE_LEVELS = {"class": 1, "fold": 2, "superfamily": 3, "family": 4}
TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,39}$")
SCCS = re.compile(r"^[a-l]\.\d+\.\d+\.\d+$")
PFAM = re.compile(r"^(PF\d{5})(\.\d+)?$")
LABELLED_SUFFIXES = (".fa", ".fasta", ".faa", ".fas", ".sto", ".stockholm", ".tsv", ".gz")


class LabelError(ValueError):
    """A labelled file that cannot be read; the message names the file and record."""


@dataclass
class LabelledSet:
    ids: list[str]
    sequences: list[str]  # upper-case residue letters
    labels: list[str]  # the task's label (Pfam accession or SCOPe superfamily)
    groups: list[str] = field(default_factory=list)  # SCOPe family (full sccs) for family-holdout; else = label
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: np.ndarray | list[int]) -> LabelledSet:
        take = [int(i) for i in index]
        return LabelledSet(*([getattr(self, f)[i] for i in take] for f in ("ids", "sequences", "labels", "groups", "sources")))

    def counts(self) -> Counter:
        return Counter(self.labels)


def expand(specs: list[str]) -> list[Path]:
    """Files, directories (their labelled files) and globs -> a sorted, de-duplicated file list."""
    out: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(LABELLED_SUFFIXES))
            if not found:
                raise LabelError(f"{p} holds no labelled files ({', '.join(LABELLED_SUFFIXES)})")
            out += found
        elif p.is_file():
            out.append(p)
        elif any(c in spec for c in "*?["):
            found = sorted(Path(f) for f in glob.glob(spec))
            if not found:
                raise LabelError(f"the pattern {spec!r} matches no files")
            out += found
        else:
            raise LabelError(f"{spec} does not exist")
    return list(dict.fromkeys(out))


def sniff(path: Path) -> str:
    with open_text(path) as fh:
        for line in fh:
            if not line.strip():
                continue
            if line.startswith("# STOCKHOLM"):
                return "stockholm"
            if line.startswith(">"):
                return "fasta"
            if "\t" in line:
                return "tsv"
            break
    raise LabelError(
        f"{path}: unknown label format (expected FASTA with labels in headers, Stockholm 1.0, or TSV id<TAB>label<TAB>sequence)"
    )


def check_task_name(task: str) -> str:
    if not TASK_NAME.match(task or ""):
        raise LabelError(
            f"task name {task!r} is not usable: it names the head, the ONNX output <task>_probabilities and TSV columns, "
            "so it must start with a letter and hold only letters, digits and _ (at most 40)"
        )
    return task


@dataclass(frozen=True)
class LabelRule:
    """How raw labels become a task's labels, and where FASTA headers keep them."""

    task: str
    level: str = "superfamily"  # scope only
    field: int = 1  # FASTA: the label is the header's Nth whitespace field after the id
    regex: str | None = None  # FASTA: or the first group of this regex, searched in the header's description

    def __post_init__(self) -> None:
        check_task_name(self.task)
        if self.level not in SCOPE_LEVELS:
            raise LabelError(f"--level must be one of {', '.join(SCOPE_LEVELS)}, got {self.level!r}")
        if self.field < 1:
            raise LabelError(f"--label-field counts header fields from 1, got {self.field}")
        if self.regex is not None:
            try:
                groups = re.compile(self.regex).groups
            except re.error as e:
                raise LabelError(f"--label-regex {self.regex!r} is not a valid regular expression: {e}") from e
            if groups < 1:
                raise LabelError(f"--label-regex {self.regex!r} needs a (group) around the label")

    def parse(self, raw: str, where: str) -> tuple[str, str]:
        """(label, group) for one raw label."""
        if self.task == "scope":
            if not SCCS.match(raw):
                raise LabelError(f"{where}: {raw!r} is not a SCOPe sccs like a.1.1.1 (class.fold.superfamily.family)")
            return ".".join(raw.split(".")[: SCOPE_LEVELS[self.level]]), raw
        if self.task == "pfam":
            m = PFAM.match(raw)
            if not m:
                raise LabelError(f"{where}: {raw!r} is not a Pfam accession like PF00041 or PF00041.20")
            return m.group(1), m.group(1)
        if not raw or raw == "-" or any(c in raw for c in "\t\r\n"):
            raise LabelError(f"{where}: label {raw!r} is empty, '-' (the no-call mark) or holds a tab or line break")
        return raw, raw

    def from_header(self, description: str, where: str) -> str:
        """The raw label in a FASTA header's description (the text after the id)."""
        if self.regex is not None:
            m = re.search(self.regex, description)
            if not m or not m.group(1):
                raise LabelError(f"{where}: --label-regex {self.regex!r} finds no label in the header {description[:80]!r}")
            return m.group(1)
        fields = description.split()
        if len(fields) < self.field:
            raise LabelError(f"{where}: no label in the header; expected '>ID LABEL ...' (field {self.field} after the id)")
        return fields[self.field - 1]


def rule_of(task: str | LabelRule) -> LabelRule:
    return task if isinstance(task, LabelRule) else LabelRule(task)


def _check_sequence(seq: str, where: str) -> str:
    if not seq:
        raise LabelError(f"{where}: empty sequence")
    bad = tokens.illegal_position(seq)
    if bad is not None:
        raise LabelError(f"{where}: illegal residue {seq[bad]!r} at position {bad + 1}")
    return seq


def _read_fasta(path: Path, rule: LabelRule) -> list[tuple[str, str, str, str]]:
    rows = []
    for r in iter_records(path):
        where = f"{path}:{r.line} (record {r.id!r})"
        if r.error:
            raise LabelError(r.error)
        label, group = rule.parse(rule.from_header(r.description, where), where)
        rows.append((r.id, _check_sequence(tokens.ascii_upper(r.sequence), where), label, group))
    return rows


def _read_stockholm(path: Path, rule: LabelRule) -> list[tuple[str, str, str, str]]:
    accession, seqs, first_line = None, {}, {}
    with open_text(path) as fh:
        for n, line in enumerate(fh, 1):
            line = line.rstrip("\n")
            if line.startswith("#=GF AC"):
                accession = line.split()[2]
            elif line.startswith("//"):
                break
            elif line and not line.startswith("#"):
                parts = line.split()
                if len(parts) != 2:
                    raise LabelError(f"{path}:{n}: expected 'NAME aligned-sequence', got {line[:60]!r}")
                seqs[parts[0]] = seqs.get(parts[0], "") + parts[1]
                first_line.setdefault(parts[0], n)
    if accession is None:
        raise LabelError(f"{path}: Stockholm file without a '#=GF AC' line, so it has no family label")
    label, group = rule.parse(accession, f"{path} (#=GF AC)")
    rows = []
    for name, aligned in seqs.items():
        seq = tokens.ascii_upper(re.sub(r"[.\-]", "", aligned))
        rows.append((name, _check_sequence(seq, f"{path}:{first_line[name]} (record {name!r})"), label, group))
    return rows


def _read_tsv(path: Path, rule: LabelRule) -> list[tuple[str, str, str, str]]:
    rows = []
    with open_text(path) as fh:
        for n, line in enumerate(fh, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#") or (n == 1 and line.lower().split("\t")[:3] == ["id", "label", "sequence"]):
                continue
            parts = line.split("\t")
            if len(parts) != 3:
                raise LabelError(f"{path}:{n}: expected 3 tab-separated columns id, label, sequence; got {len(parts)}")
            rid, raw, seq = (p.strip() for p in parts)
            where = f"{path}:{n} (record {rid!r})"
            label, group = rule.parse(raw, where)
            rows.append((rid, _check_sequence(tokens.ascii_upper(seq), where), label, group))
    return rows


READERS = {"fasta": _read_fasta, "stockholm": _read_stockholm, "tsv": _read_tsv}


def read_label_map(path: Path, rule: LabelRule) -> dict[str, tuple[str, str]]:
    """A two-column ``id<TAB>label`` file -> {id: (label, group)}."""
    path = Path(path)
    out: dict[str, tuple[str, str]] = {}
    with open_text(path) as fh:
        for n, line in enumerate(fh, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise LabelError(f"{path}:{n}: expected 2 tab-separated columns id, label; got {len(parts)}")
            rid, raw = (p.strip() for p in parts)
            if rid in out:
                raise LabelError(f"{path}:{n}: id {rid!r} is labelled twice")
            out[rid] = rule.parse(raw, f"{path}:{n} (id {rid!r})")
    return out


def _with_label_map(path: Path, labels: dict[str, tuple[str, str]], labels_path: Path) -> list[tuple[str, str, str, str]]:
    """Plain FASTA records labelled by id from a separate label file."""
    rows = []
    for r in iter_records(path):
        if r.error:
            raise LabelError(r.error)
        if r.id not in labels:
            raise LabelError(f"{path}:{r.line}: record {r.id!r} has no label in {labels_path}")
        rows.append((r.id, _check_sequence(tokens.ascii_upper(r.sequence), f"{path}:{r.line} (record {r.id!r})"), *labels[r.id]))
    return rows


def read_labelled(specs: list[str] | str, task: str | LabelRule, labels_file: Path | None = None) -> LabelledSet:
    """Read every file named by ``specs`` (files, directories, globs) for ``task`` (a name, or a ``LabelRule``).

    With ``labels_file`` (``id<TAB>label`` lines), the sequences are plain FASTA and every record's label
    comes from that file; ids missing on either side are errors.
    """
    rule = rule_of(task)
    specs = [specs] if isinstance(specs, str) else specs
    out = LabelledSet([], [], [], [], [])
    seen: dict[str, str] = {}
    label_map = read_label_map(labels_file, rule) if labels_file else None
    for path in expand(specs):
        rows = _with_label_map(path, label_map, labels_file) if label_map is not None else READERS[sniff(path)](path, rule)
        for rid, seq, label, group in rows:
            if rid in seen:
                raise LabelError(f"{path}: record id {rid!r} also occurs in {seen[rid]}; ids must be unique across the labelled files")
            seen[rid] = str(path)
            for name, value in (("ids", rid), ("sequences", seq), ("labels", label), ("groups", group), ("sources", str(path))):
                getattr(out, name).append(value)
    if not out.ids:
        raise LabelError(f"no labelled records in {', '.join(specs)}")
    if label_map is not None:
        unused = [rid for rid in label_map if rid not in seen]
        if unused:
            raise LabelError(f"{labels_file}: {len(unused)} labelled ids have no sequence in {', '.join(specs)} (first: {unused[0]!r})")
    return out
