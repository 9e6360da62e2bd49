"""Calls from a few dozen examples per class: linear probe vs the old fine-tune vs LP-FT with k-fold calibration.

    python benchmarks/few_shot.py OUT [--settings 8x60,readme,54x60,scope20] [--seeds 0,1,2] [--methods probe,old,lpft,new]
                                      [--model random:small]  (another encoder, e.g. unirep1900: rows of their own, "probe (unirep1900)")

Settings ``FxN``: F Pfam families of the 54 shared ones (54: all; fewer: a keyed draw, seed 0, printed), N training
domains per family (a family with fewer gives what it has); every family's 25 test domains are drawn once (seed 1234)
and never trained on at any N or seed. ``scopeN``: the 30 SCOPe superfamilies with at least 60 domains in the shared
SCOPe file, N training domains each (N <= 50) and 10 test domains each, drawn the same way; labels are superfamilies
(``--task scope``), and a test domain's family may occur in training. ``readme`` is the bundled example (examples/pfam.fasta, 54 x 15, tested on
the 216 domains of examples/valid.fasta). For each setting and seed (the training draw, the model's init, the
recipe's seed):

  probe  the linear probe (``distill probe``'s head: softmax regression on standardised frozen features, early stopping
         on 10% of the training part, seeded like the draw; calibrated on out-of-fold scores of every training
         sequence + residue-shuffled copies, the threshold's precision a 90% lower bound). Rows before session 7,
         calibrated on the 10% part at the point precision, are kept as ``probe-valid``
  old    ``distill finetune MODEL@SEED --folds 0 --confidence 0``: a fresh head, calibrated on the validation part at
         the point precision (the recipe before few-shot work, plus the probe baseline it must beat on validation)
  lpft   ``distill finetune MODEL@SEED --lp-ft``: LP-FT (starts from the probe's head, --lr 3e-4), k-fold calibration
  new    ``distill finetune MODEL@SEED`` (the defaults: a fresh head, k-fold runs up to 2,000 sequences that decide
         between the probe and the fine-tune out of fold and calibrate the kept kind, the threshold's precision a 90%
         lower bound; a kept probe is the ``probe`` row's head). Earlier defaults: ``new-v1``, ``new-v2``

Scored on the held-out domains: top-1, calls at the head's threshold (coverage: right calls / test domains;
precision: right / all calls) and the no-call rate of residue-shuffled copies of the test domains (decoys). Each row
goes to OUT/scores.jsonl as it is made (a killed run resumes); the table (mean +- sd over seeds) is printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PFAM = REPO.parent / "shared" / "data" / "pfam_families"
SCOPE = REPO.parent / "shared" / "data" / "scope" / "astral-scopedom-40-2.07.shared85.fa"
TEST_PER_FAMILY = 25
SCOPE_TEST, SCOPE_MIN = 10, 60  # test domains per superfamily; superfamilies with at least this many domains
METHODS = {"old": ["--folds", "0", "--confidence", "0"], "lpft": ["--lp-ft"], "new": []}


def task_of(setting: str) -> str:
    return "scope" if setting.startswith("scope") else "pfam"


def label_of(raw: str, task: str) -> str:
    """A header's first field as its class: a Pfam accession as written, a SCOPe sccs cut to its superfamily by the
    product's own label rule."""
    from distill.core.labels import rule_of

    return rule_of(task).parse(raw, "few-shot data")[0] if task == "scope" else raw


def read(path: Path, task: str = "pfam") -> list[tuple[str, str, str]]:
    """(id, sequence, class)."""
    from distill.core.fasta import read_fasta

    return [(r.id, r.sequence, label_of(r.description.split()[0], task)) for r in read_fasta(path)]


def write(path: Path, records: list[tuple[str, str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f">{i} {label}\n{s}\n" for i, s, label in records))
    return path


def make_data(out: Path, setting: str, seed: int) -> tuple[Path, Path]:
    """(train, test) FASTA files of a setting and seed: each class's test domains drawn once (seed 1234), its
    training domains drawn from the rest with the seed."""
    if setting == "readme":
        return REPO / "examples" / "pfam.fasta", REPO / "examples" / "valid.fasta"
    if task_of(setting) == "scope":
        groups, n_test, per_class = scope_groups(), SCOPE_TEST, int(setting.removeprefix("scope"))
    else:
        groups, n_test, per_class = pfam_groups(setting), TEST_PER_FAMILY, int(setting.split("x")[1])
    train, test = [], []
    for k, records in enumerate(groups):
        order = np.random.default_rng([1234, k]).permutation(len(records))
        test += [records[i] for i in order[:n_test]]
        train += [records[i] for i in np.random.default_rng([seed, k]).permutation(order[n_test:])[:per_class]]
    root = out / "data" / f"{setting}-s{seed}"
    return write(root / "train.fasta", train), write(root / "test.fasta", test)


def pfam_groups(setting: str) -> list[list[tuple[str, str, str]]]:
    """The records of each Pfam family of ``FxN`` (all 54, or F of them drawn with seed 0)."""
    files = sorted(PFAM.glob("PF*.fasta"))
    n_families = int(setting.split("x")[0])
    if n_families < len(files):
        files = sorted(np.random.default_rng(0).choice(files, n_families, replace=False).tolist())
        print(f"{setting}: families {' '.join(Path(f).stem for f in files)}", flush=True)
    return [read(Path(f)) for f in files]


def scope_groups() -> list[list[tuple[str, str, str]]]:
    """The records of each SCOPe superfamily with at least ``SCOPE_MIN`` domains; headers keep the full sccs, so
    `--task scope` reads the superfamily."""
    from distill.core.fasta import read_fasta

    classes: dict[str, list[tuple[str, str, str]]] = {}
    for r in read_fasta(SCOPE):
        sccs = r.description.split()[0]
        classes.setdefault(label_of(sccs, "scope"), []).append((r.id, r.sequence.upper(), sccs))
    return [classes[c] for c in sorted(classes) if len(classes[c]) >= SCOPE_MIN]


def score(probabilities: np.ndarray, labels: list[str], threshold: float, truth: list[str], decoys: np.ndarray) -> dict:
    top, p = probabilities.argmax(1), probabilities.max(1)
    right = np.array([labels[i] == t for i, t in zip(top, truth, strict=True)])
    called = p >= threshold
    return {"top1": float(right.mean()), "coverage": float((right & called).mean()), "calls": int(called.sum()),
            "precision": float((right & called).sum() / max(called.sum(), 1)), "decoy_nocall": float((decoys.max(1) < threshold).mean()),
            "threshold": float(threshold), "n_test": len(truth)}  # fmt: skip


def run_probe(model: str, train: Path, test: Path, task: str, seed: int) -> dict:
    """``distill probe``'s head and calibration, in process: the product's ``run_probe`` on the training file (no split),
    calibrated out of fold with residue-shuffled copies of up to 1,000 training sequences as ``distill probe`` does."""
    from distill.core.calibration import probe_negatives, shuffled
    from distill.core.labels import LabelledSet
    from distill.inference.embeddings import featurizer
    from distill.recipes.probe import Split
    from distill.recipes.probe import run_probe as product_probe

    tr, te = read(train, task), read(test, task)
    as_set = lambda rs: LabelledSet(*([r[k] for r in rs] for k in (0, 1, 2, 2)))  # noqa: E731
    feat = featurizer(model)
    x, test_x = feat.features([r[1] for r in tr]), feat.features([r[1] for r in te])
    pick = probe_negatives(len(tr), seed)  # the seed the fine-tune's probe baseline takes: a kept probe is this head
    neg = feat.features(shuffled([tr[i][1] for i in pick], seed))
    split = Split(np.arange(len(tr)), np.array([], dtype=np.int64))
    result = product_probe(x, as_set(tr), task, split, {}, test_features=test_x, test_ds=as_set(te), negative_features=neg,
                           negative_index=pick, seed=seed)  # fmt: skip
    head, seqs = result.head, [r[1] for r in te]
    return score(head.probabilities(test_x), head.labels, head.card["calibration"]["threshold"], [r[2] for r in te],
                 head.probabilities(feat.features(shuffled(seqs, 1))))  # fmt: skip


def run_finetune(model: str, train: Path, test: Path, task: str, run: Path, seed: int, flags: list[str]) -> dict:
    from distill.core.calibration import shuffled
    from distill.inference import resolve

    if not (run / "model").exists():
        resume = ["--resume"] if (run / "checkpoint.json").exists() else []
        # fewer than 10 a class: the validation part needs a fifth to hold one of each (the recipe says so and stops)
        small = ["--valid-fraction", "0.2"] if min(Counter(r[2] for r in read(train, task)).values()) < 10 else []
        cmd = [sys.executable, "-m", "distill", "finetune", model, "--data", str(train), "--task", task, "--out", str(run),
               "--seed", str(seed), "--quiet", *flags, *small, *resume]  # fmt: skip
        subprocess.run(cmd, check=True)
    e = resolve(str(run / "model"), providers="cpu")
    te = read(test, task)
    seqs = [r[1] for r in te]
    probs = lambda s: e.run(s, [task])[1][task]  # noqa: E731
    card = json.loads((run / "model" / "heads" / task / "labels.json").read_text())
    row = score(probs(seqs), e.labels[task], e.thresholds[task], [r[2] for r in te], probs(shuffled(seqs, 1)))
    return row | {"kept": card.get("kept", "fine-tuned"), "pool": card["calibration"].get("pool", "validation")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--settings", default="8x60,readme,54x60")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default="probe,old,new")
    ap.add_argument("--model", default="random:small")
    args = ap.parse_args()
    scores = args.out / "scores.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    done = {(r["setting"], r["seed"], r["method"]) for r in map(json.loads, scores.read_text().splitlines())} if scores.exists() else set()
    for setting in args.settings.split(","):
        for seed in map(int, args.seeds.split(",")):
            train, test = make_data(args.out, setting, seed)
            for method in args.methods.split(","):
                label = method if args.model == "random:small" else f"{method} ({args.model})"  # another encoder: rows of its own
                if (setting, seed, label) in done:
                    continue
                t0, model = time.perf_counter(), f"{args.model}@{seed}" if args.model.startswith("random:") else args.model
                run = args.out / "runs" / f"{setting}-s{seed}-{label.replace(' ', '-').strip('()')}"
                task = task_of(setting)
                if method == "probe":
                    row = run_probe(model, train, test, task, seed)
                else:
                    row = run_finetune(model, train, test, task, run, seed, METHODS[method])
                row = {"setting": setting, "seed": seed, "method": label, **row, "seconds": round(time.perf_counter() - t0, 1)}
                print(json.dumps(row), flush=True)
                with open(scores, "a") as f:
                    f.write(json.dumps(row) + "\n")
    table(scores)


def table(scores: Path) -> None:
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    print("| setting | method | seeds | top-1 | coverage at threshold | calls: right / all (all seeds) | decoy no-call | probe kept |")
    print("|---|---|---|---|---|---|---|---|")
    for key in dict.fromkeys((r["setting"], r["method"]) for r in rows):
        group = [r for r in rows if (r["setting"], r["method"]) == key]
        ms = lambda k, g=group: f"{np.mean([r[k] for r in g]):.3f} +- {np.std([r[k] for r in g]):.3f}"  # noqa: E731
        kept = "-" if key[1].startswith("probe") else sum(r.get("kept") == "probe" for r in group)
        right, calls = sum(round(r["coverage"] * r["n_test"]) for r in group), sum(r["calls"] for r in group)
        cells = [key[0], key[1], len(group), ms("top1"), ms("coverage"), f"{right} / {calls}", ms("decoy_nocall"), kept]
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
