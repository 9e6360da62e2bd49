"""Cut the real-data sweep's sets from ../shared/data (docs/results.md); deterministic.

    python benchmarks/sweep_data.py OUT_DIR

Every labelled file is split 50/50 by a hash of the record id: one half joins the masked-LM training set
(with the unlabelled UniProt proteins), the other half is only ever probed, so the probes never test on
sequences the teacher or the students saw in training.
    mlm.fasta      ProFET UniProt train+valid + the MLM halves (Pfam capped at 60 per family, SCOPe 2,500)
    valid.fasta    ProFET test split (held-out perplexity)
    pfam/          probe halves of the 54 Pfam families, capped at 100 per family
    pfam_finetune_train.fasta, pfam_finetune_test.fasta
                   the same records split 80/20 by another hash of the id: the sweep's fine-tuned calls
    scope.fa       probe half of SCOPe 2.07 40% (ASTRAL headers)
"""

import csv
import hashlib
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill.core.fasta import iter_records  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def read_fasta(path: Path) -> list[tuple[str, str]]:
    """(header without '>', sequence) pairs through the package's reader."""
    return [(f"{r.id} {r.description}".strip(), r.sequence) for r in iter_records(path, warn_duplicates=False)]


def id_hash(header: str) -> bytes:
    """A keyed hash of the record id: membership in a split does not depend on file order."""
    return hashlib.blake2b(header.split()[0].encode(), digest_size=8).digest()


def probe_half(header: str) -> bool:
    return id_hash(header)[0] % 2 == 0


def finetune_test(header: str) -> bool:  # another byte of the same hash: independent of probe_half
    return id_hash(header)[1] % 5 == 0


def write(path: Path, records: list[tuple[str, str]]) -> None:
    path.write_text("".join(f">{h}\n{s.upper()}\n" for h, s in records))


def main(out: Path) -> None:
    rng = random.Random(3)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pfam").mkdir(exist_ok=True)
    mlm, finetune = [], {True: [], False: []}
    for split in ("train", "valid", "test"):
        with open(SHARED / "unlabeled" / f"ProFET_NP_SP_Cleaved.{split}.csv") as f:
            rows = [(f"ProFET_{split}_{i:04d}", r["seq"].upper()) for i, r in enumerate(csv.DictReader(f))]
        rows = [(h, s) for h, s in rows if set(s) <= set("LAGVSERTIDPKQNFYMHWCXBUZO")]
        if split == "test":
            write(out / "valid.fasta", rows)
        else:
            mlm += rows
    for family in sorted((SHARED / "pfam_families").glob("PF*.fasta")):
        records = read_fasta(family)
        probe = [r for r in records if probe_half(r[0])]
        train = [r for r in records if not probe_half(r[0])]
        mlm += rng.sample(train, min(60, len(train)))
        picked = rng.sample(probe, min(100, len(probe)))
        write(out / "pfam" / family.name, picked)
        for r in picked:
            finetune[finetune_test(r[0])].append(r)
    write(out / "pfam_finetune_train.fasta", finetune[False])
    write(out / "pfam_finetune_test.fasta", finetune[True])
    scope = read_fasta(SHARED / "scope" / "astral-scopedom-40-2.07.shared85.fa")
    mlm += rng.sample([r for r in scope if not probe_half(r[0])], 2500)
    write(out / "scope.fa", [r for r in scope if probe_half(r[0])])
    rng.shuffle(mlm)
    write(out / "mlm.fasta", mlm)
    print(f"mlm.fasta {len(mlm)} records")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
