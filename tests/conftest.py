from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from esm_checkpoints import write_tiny_esm1b, write_tiny_esm2  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
EXAMPLES = REPO / "examples"


def shared(path: str) -> Path:
    p = SHARED / path
    if not p.exists():
        pytest.skip(f"staged data {p} not present")
    return p


@pytest.fixture(scope="session")
def tiny_esm1b(tmp_path_factory) -> Path:
    return write_tiny_esm1b(tmp_path_factory.mktemp("esm1b") / "esm1b_t2_tiny.pt")


@pytest.fixture(scope="session")
def tiny_esm2(tmp_path_factory) -> Path:
    return write_tiny_esm2(tmp_path_factory.mktemp("esm2") / "esm2_t2_tiny.pt")


@pytest.fixture(scope="session")
def real_sequences() -> list[str]:
    """Real proteins of mixed lengths: SCOPe domains (20-300 aa) from the staged data."""
    from distill.fasta import read_fasta

    records = list(read_fasta(shared("scope/astral-scopedom-40-2.07.shared85.fa")))
    rng = random.Random(0)
    picks = rng.sample([r.sequence for r in records if len(r.sequence) <= 300], 6)
    return sorted(picks, key=len)


def write_fasta(path: Path, records: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f">{rid}\n{seq}\n" for rid, seq in records))
    return path


@pytest.fixture
def small_fasta(tmp_path) -> Path:
    """60 real Pfam domains (3 families) for quick training runs."""
    from distill.fasta import read_fasta

    records = []
    for fam in ("PF00018", "PF00397", "PF00096"):
        records += [(r.id, r.sequence) for r in list(read_fasta(shared(f"pfam_families/{fam}.fasta")))[:20]]
    return write_fasta(tmp_path / "small.fasta", records)
