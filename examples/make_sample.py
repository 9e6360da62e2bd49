"""Rebuild the bundled sample from the staged data (run from the repo root; needs ../shared/data).

    python examples/make_sample.py

Deterministic (seeded). The product never reads ../shared at run time; this script only documents
how examples/*.fasta were made. Provenance of the sources: examples/SOURCES.md.
"""

import csv
import random
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OUT = Path(__file__).resolve().parent


def wrap(seq: str, width: int = 60) -> str:
    return "\n".join(seq[i : i + width] for i in range(0, len(seq), width))


def read_fasta(path: Path) -> list[tuple[str, str]]:
    records, header, chunks = [], None, []
    for line in path.read_text().splitlines():
        if line.startswith(">"):
            if header:
                records.append((header, "".join(chunks)))
            header, chunks = line[1:], []
        else:
            chunks.append(line.strip())
    if header:
        records.append((header, "".join(chunks)))
    return records


def main() -> None:
    rng = random.Random(7)
    train, valid, pfam = [], [], []
    for family in sorted((SHARED / "pfam_families").glob("PF*.fasta")):
        records = read_fasta(family)
        rng.shuffle(records)
        train += records[:20]
        valid += records[20:24]
        pfam += records[24:39]  # labelled probe sample, disjoint from train/valid
    with open(SHARED / "unlabeled" / "ProFET_NP_SP_Cleaved.train.csv") as f:
        rows = [r["seq"] for r in csv.DictReader(f)]
    for i in sorted(rng.sample(range(len(rows)), 300)):
        train.append((f"ProFET_train_{i:04d} UniProt protein (ProFET_NP_SP_Cleaved.train.csv row {i + 1})", rows[i].upper()))
    rng.shuffle(train)
    (OUT / "train.fasta").write_text("".join(f">{h}\n{wrap(s)}\n" for h, s in train))
    (OUT / "valid.fasta").write_text("".join(f">{h}\n{wrap(s)}\n" for h, s in valid))
    (OUT / "pfam.fasta").write_text("".join(f">{h}\n{wrap(s)}\n" for h, s in pfam))
    scope = scope_sample()
    (OUT / "scope.fasta").write_text("".join(f">{h}\n{wrap(s.upper())}\n" for h, s in scope))
    print(f"train.fasta: {len(train)}, valid.fasta: {len(valid)}, pfam.fasta: {len(pfam)}, scope.fasta: {len(scope)} records")


def scope_sample(superfamilies: int = 20, per_superfamily: int = 25) -> list[tuple[str, str]]:
    """SCOPe domains of 20 superfamilies with at least 3 families each (so family-holdout has something to hold out)."""
    rng = random.Random(11)
    by_sf: dict[str, list[tuple[str, str]]] = {}
    for header, seq in read_fasta(SHARED / "scope" / "astral-scopedom-40-2.07.shared85.fa"):
        sf = ".".join(header.split()[1].split(".")[:3])
        by_sf.setdefault(sf, []).append((header, seq))
    eligible = sorted(sf for sf, rows in by_sf.items() if len({h.split()[1] for h, _ in rows}) >= 3 and len(rows) >= per_superfamily)
    out = []
    for sf in sorted(rng.sample(eligible, superfamilies)):
        out += rng.sample(by_sf[sf], per_superfamily)
    return out


if __name__ == "__main__":
    main()
