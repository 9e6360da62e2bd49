"""The one train/test split of benchmarks/classify_vs_hmmer.py, cut from ../shared/data; deterministic.

    python benchmarks/classify_split.py OUT_DIR [--seed 0]

Pfam: per family (54), a seeded random at most 200 training and 40 test sequences.
SCOPe 2.07 (40%): superfamilies with at least 5 domains; per superfamily a seeded random 20% (at least 1) is test,
the rest training, capped at 50. Superfamilies with fewer than 5 domains are written as ``scope_outside.fa``:
real proteins outside the label set, which the no-call must reject (never used to train a class).
Each test domain is marked "seen" or "unseen" by whether any training domain shares its SCOPe family.

Writes pfam_train.fasta, pfam_test.fasta, scope_train.fa, scope_test.fa, scope_outside.fa, split.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill.core.fasta import iter_records  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
PFAM_TRAIN, PFAM_TEST = 200, 40
SCOPE_MIN, SCOPE_TRAIN_CAP, SCOPE_TEST_FRACTION = 5, 50, 0.2


def records(path: Path) -> list[tuple[str, str, str]]:
    return [(r.id, r.description, r.sequence.upper()) for r in iter_records(path, warn_duplicates=False)]


def write(path: Path, rows: list[tuple[str, str, str]]) -> None:
    path.write_text("".join(f">{rid} {desc}\n{seq}\n" for rid, desc, seq in rows))


def split_pfam(rng: random.Random) -> tuple[list, list]:
    train, test = [], []
    for f in sorted((SHARED / "pfam_families").glob("PF*.fasta")):
        rows = records(f)
        rng.shuffle(rows)
        test += rows[:PFAM_TEST]
        train += rows[PFAM_TEST : PFAM_TEST + PFAM_TRAIN]
    return train, test


def split_scope(rng: random.Random) -> tuple[list, list, list, dict]:
    by_sf: dict[str, list] = defaultdict(list)
    for row in records(next((SHARED / "scope").glob("*.fa"))):
        by_sf[".".join(row[1].split()[0].split(".")[:3])].append(row)
    train, test, outside = [], [], []
    for sf in sorted(by_sf):
        rows = by_sf[sf]
        if len(rows) < SCOPE_MIN:
            outside += rows
            continue
        rng.shuffle(rows)
        n_test = max(1, round(SCOPE_TEST_FRACTION * len(rows)))
        test += rows[:n_test]
        train += rows[n_test:][:SCOPE_TRAIN_CAP]
    families = {r[1].split()[0] for r in train}
    seen = {r[0]: r[1].split()[0] in families for r in test}
    return train, test, outside, seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pfam_train, pfam_test = split_pfam(random.Random(args.seed))
    scope_train, scope_test, outside, seen = split_scope(random.Random(args.seed + 1))
    for name, rows in [("pfam_train.fasta", pfam_train), ("pfam_test.fasta", pfam_test), ("scope_train.fa", scope_train),
                       ("scope_test.fa", scope_test), ("scope_outside.fa", outside)]:  # fmt: skip
        write(args.out / name, rows)
    info = {
        "seed": args.seed,
        "pfam": {"train": len(pfam_train), "test": len(pfam_test), "families": len({r[1] for r in pfam_train})},
        "scope": {
            "train": len(scope_train),
            "test": len(scope_test),
            "outside": len(outside),
            "superfamilies": len({".".join(r[1].split()[0].split(".")[:3]) for r in scope_train}),
            "test_family_seen": sum(seen.values()),
            "test_family_unseen": len(seen) - sum(seen.values()),
        },  # fmt: skip
        "scope_test_seen": seen,
    }
    (args.out / "split.json").write_text(json.dumps(info, indent=1))
    print(json.dumps({k: v for k, v in info.items() if k != "scope_test_seen"}))


if __name__ == "__main__":
    main()
