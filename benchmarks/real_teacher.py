"""Distilling a real protein LM on this CPU: UniRep-1900 -> `small` students, each way, probed on real labels.

    python benchmarks/real_teacher.py OUT [--n 3000] [--seeds 0] [--epochs 10] [--batch-size 64] [--ways vanilla,logit,rep,both]
                                          [--tasks scope,fold,pfam] [--with-teacher] [--teacher unirep1900+int8] [--cache-only]
                                          [--preset medium]

Stages, each skipped when its output exists (a killed run resumes where it stopped):
  1. data      OUT/train.fasta, OUT/valid.fasta: N (+ 200) proteins of at most 1,022 residues, drawn with seed 0 from
               ../shared/data/unlabeled/corpus_*.fasta.gz, leaving out whole proteomes reserved for the open-world
               calls benchmark (E. coli K-12, S. cerevisiae, M. tuberculosis H37Rv: OX= 83333, 559292, 83332), so no
               student has seen the proteomes its calls are judged on. No Pfam or SCOPe material is in the corpus
               (its SOURCES file), so the probes test on sequences no model trained on.
  2. cache     OUT/cache: `distill teacher-cache --teacher TEACHER --views EPOCHS` (one UniRep pass serves every view;
               TEACHER unirep1900, or unirep1900+int8: 4.3x faster, see docs/benchmarks.md); --cache-only stops here
  3. students  OUT/students/WAY-sSEED: `distill fit --preset small` from the cache (--preset medium:
               OUT/students/medium-WAY-sSEED, probed beside random:medium@SEED):
               vanilla (lam 0), logit (lam 0.5, T 2), rep (lam 0 + pooled representation KD, weight 1),
               rep-centred (the same against the teacher's states less their mean), rep-mse (mean squared error,
               weight 70), rep-res (per-residue states, cosine; a live teacher, not the cache), both (logit + rep-mse)
  4. probes    `distill evaluate` of each seed's students, random:small@SEED (and composition) on SCOPe 2.07
               superfamilies (family-holdout: the test domains' families never occur in training), on SCOPe folds
               (`fold`: superfamily-holdout, TAPE's remote-homology task), on SCOPe superfamilies split at random
               (`seen`: the test domains' families occur in training) and on the 54 Pfam families (random split),
               one table per seed: OUT/eval-TASK-sSEED-WAYS (results.md, .csv, .json, figures);
               with --with-teacher UniRep-1900's own probe (OUT/eval-TASK-s0-unirep); then the summary over seeds
               (OUT/summary-TASK.json, started from the last one): accuracy per way, paired gains over random init and
               over MLM only; OUT/summary.png, the ways side by side
Prints the two tables at the end.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESERVED = {"83333", "559292", "83332"}  # OX= of the proteomes the open-world calls benchmark is judged on
WAYS = {
    "vanilla": ["--lam", "0"],
    "logit": ["--lam", "0.5", "--temperature", "2"],
    "rep": ["--lam", "0", "--rep-weight", "1", "--rep-level", "pooled"],
    "rep-centred": ["--lam", "0", "--rep-weight", "1", "--rep-level", "pooled", "--rep-centre"],
    # UniRep's pooled states have mean square 0.014: weight 70 starts the MSE term near cosine's 1
    "rep-mse": ["--lam", "0", "--rep-weight", "70", "--rep-level", "pooled", "--rep-loss", "mse"],
    # per-residue states: the cache keeps pooled ones only, so the teacher runs live (use --teacher unirep1900+int8)
    "rep-res": ["--lam", "0", "--rep-weight", "1", "--rep-level", "residue"],
    # the logit way's KD plus the best representation term (rep-mse)
    "both": ["--lam", "0.5", "--temperature", "2", "--rep-weight", "70", "--rep-level", "pooled", "--rep-loss", "mse"],
}


def corpus() -> list[tuple[str, str]]:
    records = []
    for path in sorted((SHARED / "unlabeled").glob("corpus_*.fasta.gz")):
        with gzip.open(path, "rt") as f:
            header, seq = None, []
            for line in [*f, ">"]:
                if line.startswith(">"):
                    if header and not RESERVED & set(re.findall(r"OX=(\d+)", header)) and len("".join(seq)) <= 1022:
                        records.append((header.split()[0], "".join(seq)))
                    header, seq = line[1:].strip(), []
                else:
                    seq.append(line.strip())
    return records


def write_data(out: Path, n: int) -> None:
    if (out / "train.fasta").exists():
        return
    records = corpus()
    pick = np.random.default_rng(0).permutation(len(records))[: n + 200]
    out.mkdir(parents=True, exist_ok=True)
    for name, idx in (("valid", pick[:200]), ("train", pick[200:])):
        (out / f"{name}.fasta").write_text("".join(f">{records[i][0]}\n{records[i][1]}\n" for i in idx))
    print(f"data: {n} train + 200 valid of {len(records):,} eligible corpus proteins (reserved proteomes left out)")


def distill(*args: str) -> None:
    print("$ distill " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "distill", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument(
        "--batch-size", type=int, default=64, help="sequences per step (the preset's 512 leaves a few thousand sequences 6 steps an epoch)"
    )
    ap.add_argument("--ways", default=",".join(WAYS))
    ap.add_argument("--tasks", default="scope,fold,pfam", help="probe tables, in this order: scope, fold, pfam, seen")
    ap.add_argument("--with-teacher", action="store_true", help="also probe UniRep-1900 itself under the same protocol")
    ap.add_argument("--teacher", default="unirep1900", help="the cache's teacher spec (unirep1900+int8: the int8 recurrence)")
    ap.add_argument("--cache-only", action="store_true", help="stop after the data and the cache (run the teacher now, train later)")
    ap.add_argument("--preset", default="small", help="the students' size; not small: their ways are named PRESET-WAY")
    args = ap.parse_args()
    out, seeds, ways = args.out, [int(s) for s in args.seeds.split(",")], args.ways.split(",")
    label = {w: w if args.preset == "small" else f"{args.preset}-{w}" for w in ways}  # run and table names
    from distill.recipes.fit import fit_finished

    write_data(out, args.n)
    cache = out / "cache"
    for seed in seeds:  # masking is keyed by the training seed: one cache per seed
        # masking is keyed by the training seed, but ways with lam 0 read only the (seed-free) pooled embeddings
        needs_logits = any(float(WAYS[w][WAYS[w].index("--lam") + 1]) > 0 for w in ways)
        seed_cache = cache if seed == 0 or not needs_logits else out / f"cache-s{seed}"
        if not (seed_cache / "meta.json").exists() or '"complete": true' not in (seed_cache / "meta.json").read_text():
            distill("teacher-cache", str(out / "train.fasta"), "--teacher", args.teacher, "--views", str(args.epochs),
                    "--seed", str(seed), "-o", str(seed_cache), "--quiet")  # fmt: skip
        if args.cache_only:
            continue
        for way in ways:
            run = out / "students" / f"{label[way]}-s{seed}"
            if fit_finished(run) or ((run / "student").exists() and not (run / "checkpoint.json").exists()):  # or a kept bundle
                continue
            resume = ["--resume", str(run)] if (run / "checkpoint.json").exists() else ["--out", str(run)]
            cached = [] if way == "vanilla" else ["--teacher", args.teacher] if way == "rep-res" else ["--teacher-cache", str(seed_cache)]
            distill("fit", str(out / "train.fasta"), "--valid", str(out / "valid.fasta"), "--preset", args.preset, "--epochs",
                    str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(seed), *cached, *WAYS[way], *resume, "--quiet")  # fmt: skip
    if args.cache_only:
        return
    scope = str(SHARED / "scope" / "astral-scopedom-40-2.07.shared85.fa")
    probes = {  # table name -> the evaluate task and data (one SCOPe file, two remote-homology levels)
        "scope": ["--task", "scope", "--data", scope, "--split", "family-holdout"],
        "seen": ["--task", "scope", "--data", scope, "--split", "random"],  # superfamilies again, test families seen
        "fold": ["--task", "scope", "--level", "fold", "--data", scope, "--split", "superfamily-holdout"],
        "pfam": ["--task", "pfam", "--data", str(SHARED / "pfam_families")],
    }
    for task in filter(None, args.tasks.split(",")):
        for seed in seeds:  # one table per seed and task: later seeds and ways add tables, never redo one
            models = [str(out / "students" / f"{label[w]}-s{seed}" / "student") for w in ways] + [f"random:{args.preset}@{seed}"]
            models += ["composition"] if seed == 0 and args.preset == "small" else []
            table = out / f"eval-{task}-s{seed}-{'+'.join(label.values())}"
            if not (table / "results.md").exists():
                distill("evaluate", *models, *probes[task], "--no-baselines", "--out", str(table))
            print((table / "results.md").read_text())
        teacher_table = out / f"eval-{task}-s0-unirep"  # the teacher's own probe, once (~35 min of UniRep for SCOPe)
        if args.with_teacher and not (teacher_table / "results.md").exists():
            distill("evaluate", "unirep1900", *probes[task], "--no-baselines", "--out", str(teacher_table))
        print(summary(out, task, seeds))
    if args.tasks:
        print(f"figure: {plot(out, [t for t in args.tasks.split(',') if (out / f'summary-{t}.json').exists()])}")


def way_and_seed(spec: str) -> tuple[str, int]:
    """A table row's spec -> (way, seed): students/WAY-sSEED/student, random:small@SEED, or a fixed model (seed 0)."""
    if spec.startswith("random:"):
        preset, seed = spec.removeprefix("random:").rsplit("@", 1)
        return "random" if preset == "small" else f"{preset}-random", int(seed)
    if "/students/" in spec:
        way, seed = Path(spec).parent.name.rsplit("-s", 1)
        return way, int(seed)
    return spec, 0


def summary(out: Path, task: str, seeds: list[int]) -> str:
    """Accuracy per way and seed, gathered from the last summary and every table of the task (OUT/eval-TASK-s*-*/), and the paired gains
    over random init and over MLM only (mean and 95% t interval over the seeds both have); kept in OUT/summary-TASK.json."""
    from distill.recipes.sweep.stats import t_interval

    kept = out / f"summary-{task}.json"  # earlier tables may be gone: their figures live on in the last summary
    acc = {w: {int(s): v for s, v in by.items()} for w, by in json.loads(kept.read_text()).items()} if kept.exists() else {}
    for results in sorted(out.glob(f"eval-{task}-s*-*/results.json")):
        for row in json.loads(results.read_text())["rows"]:
            way, seed = way_and_seed(row["spec"])
            acc.setdefault(way, {})[seed] = row["accuracy"]

    def gain(way: str, base: str) -> str:
        base = f"{way.split('-')[0]}-{base}" if way.split("-")[0] in ("medium", "large") else base  # same size
        pairs = [v - acc[base][s] for s, v in acc[way].items() if s in acc.get(base, {})]
        return t_interval(pairs).text(3) if pairs and way != base else "-"

    lines = [
        f"{task}: accuracy by way over seeds",
        "| way | seeds | accuracy | minus random init | minus MLM only |",
        "|---|---|---|---|---|",
    ]
    for way, by_seed in acc.items():
        mean = sum(by_seed.values()) / len(by_seed)
        lines.append(f"| {way} | {len(by_seed)} | {mean:.3f} | {gain(way, 'random')} | {gain(way, 'vanilla')} |")
    (out / f"summary-{task}.json").write_text(json.dumps(acc, indent=1))
    return "\n".join(lines)


TITLES = {
    "scope": "SCOPe superfamily, family-holdout",
    "seen": "SCOPe superfamily, random split",
    "fold": "SCOPe fold, superfamily-holdout",
    "pfam": "Pfam families",
}
WAY_ORDER = ["random", "vanilla", "logit", "rep", "rep-mse", "both"]  # the ways, then the others as found


def plot(out: Path, tasks: list[str]) -> Path:
    """OUT/summary.png: one panel per task, each `small` way's accuracy per seed (dots) and mean (bar), UniRep's dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        acc = json.loads((out / f"summary-{task}.json").read_text())
        ways = [w for w in WAY_ORDER if w in acc] + [w for w in acc if w not in WAY_ORDER and len(acc[w]) > 1]
        for i, way in enumerate(ways):
            values = list(acc[way].values())
            ax.bar(i, np.mean(values), color="#9ecae1" if way != "random" else "#d9d9d9")
            ax.plot([i] * len(values), values, "k.", ms=6)
        if teacher := next((w for w in ("unirep1900", "unirep1900+int8") if w in acc), None):
            ax.axhline(acc[teacher]["0"], ls="--", c="#d62728", label=f"{teacher}'s own probe")
            ax.legend(loc="upper left", fontsize=8)
        ax.set_xticks(range(len(ways)), ways, rotation=30)
        ax.set(title=f"{TITLES.get(task, task)}: one dot a seed", ylabel="frozen linear probe, test accuracy")
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=110)
    plt.close(fig)
    return out / "summary.png"


if __name__ == "__main__":
    main()
