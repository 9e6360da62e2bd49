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
    train, valid = [], []
    for family in sorted((SHARED / "pfam_families").glob("PF*.fasta")):
        records = read_fasta(family)
        rng.shuffle(records)
        train += records[:20]
        valid += records[20:24]
    with open(SHARED / "unlabeled" / "ProFET_NP_SP_Cleaved.train.csv") as f:
        rows = [r["seq"] for r in csv.DictReader(f)]
    for i in sorted(rng.sample(range(len(rows)), 300)):
        train.append((f"ProFET_train_{i:04d} UniProt protein (ProFET_NP_SP_Cleaved.train.csv row {i + 1})", rows[i].upper()))
    rng.shuffle(train)
    (OUT / "train.fasta").write_text("".join(f">{h}\n{wrap(s)}\n" for h, s in train))
    (OUT / "valid.fasta").write_text("".join(f">{h}\n{wrap(s)}\n" for h, s in valid))
    print(f"train.fasta: {len(train)} records, valid.fasta: {len(valid)} records")


if __name__ == "__main__":
    main()
