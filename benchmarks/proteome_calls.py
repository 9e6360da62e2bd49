"""Calls on whole proteomes, scored against HMMER profiles of the same label set (the open-world benchmark).

    python benchmarks/proteome_calls.py OUT [--model random:small] [--per-family 200] [--align 200]
                                            [--report ecoli,kuenenia] [--variants plain,background,head-plain,head]

Closed test sets (held-out Pfam domains) say how well a call is made when the answer is one of the labels. A
proteome asks the other question: most of its proteins belong to none of the labels, and many hold a relative of
one as a domain. Stages, each skipped when its output exists:
  1. data     OUT/data: references (``--per-family`` Pfam domains per family of the 54 shared families, seed 0) and
              proteomes taken whole from ../shared/data/unlabeled: the background (Synechocystis sp. PCC 6803) that a
              ``--background`` index calibrates on, the development proteome every design choice was looked at on
              (Rhizobium skierniewicense), and the report proteomes (E. coli K-12, Kuenenia stuttgartiensis),
              annotated only to be scored.
  2. hmmer    OUT/hmmer/NAME.tsv: per proteome, hmmscan against profiles built from the same references (FAMSA MSA ->
              hmmbuild, pyfamsa + pyhmmer): every domain hit with its i-Evalue and envelope.
  3. index    OUT/index-VARIANT: `distill index MODEL --data refs --align N` (plain) and the same with
              ``--background`` (per-label thresholds from real non-members).
     finetune OUT/finetune-VARIANT: the fine-tuned heads' variants, `distill finetune MODEL --data refs --task pfam`
              (head-plain: defaults, one mean embedding per protein) and the same with ``--background`` (head: real
              negatives, flanked training windows, per-label thresholds, a head that scans proteins in windows).
  4. annotate OUT/calls-VARIANT/NAME.tsv (+ .domains.tsv): `distill annotate PROTEOME --reference INDEX`, or
              `--model OUT/finetune-VARIANT/model` for the heads (their call: the TSV's pfam_label_1).
  5. score    per proteome and variant (``--stages score --variants old`` scores OUT/calls-old/, made elsewhere): calls, agreement with HMMER (the called label has an HMMER domain in the protein
              at i-Evalue <= 0.01 and <= 1e-5), recall of the proteins HMMER assigns at <= 1e-5, calls on proteins
              where HMMER finds none of the labels at 0.01, and for agreed domain calls the share whose coordinates
              overlap HMMER's envelope by >= 50% (of the shorter), with 95% Wilson intervals. Written to
              OUT/results-VARIANTS.json; the table of docs/results.md is printed.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
UNLABELED = SHARED / "unlabeled"
PROTEOMES = {  # name: (corpus file, a header substring that selects the proteome)
    "synechocystis": ("corpus_uniprot_refproteomes_B.fasta.gz", "OS=Synechocystis sp"),
    "rhizobium": ("corpus_uniprot_refproteomes_A.fasta.gz", "OX=984260"),
    "ecoli": ("corpus_uniprot_refproteomes_A.fasta.gz", "OX=83333"),
    "kuenenia": ("corpus_uniprot_refproteomes_B.fasta.gz", "OS=Kuenenia stuttgartiensis"),
}
BACKGROUND, DEVELOPMENT = "synechocystis", "rhizobium"
AGREE_EVALUES = (1e-2, 1e-5)
OVERLAP = 0.5


def prepare(out: Path, per_family: int) -> None:
    data = out / "data"
    if (data / "refs.fasta").is_file():
        return
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for path in sorted((SHARED / "pfam_families").glob("PF*.fasta")):
        records = _read_fasta(path.read_text().splitlines())
        pick = sorted(rng.permutation(len(records))[:per_family])
        lines += [f">{records[i][0]}\n{records[i][1]}\n" for i in pick]
    for name, (file, key) in PROTEOMES.items():
        with gzip.open(UNLABELED / file, "rt") as f:
            records = [(h, s) for h, s in _read_fasta(f) if key in h]
        (data / f"{name}.fasta").write_text("".join(f">{h}\n{s}\n" for h, s in records))
        print(f"{name}: {len(records)} proteins", flush=True)
    (data / "refs.fasta").write_text("".join(lines))


def _read_fasta(lines) -> list[tuple[str, str]]:  # noqa: ANN001
    out, head, seq = [], None, []
    for line in lines:
        line = line.rstrip("\n")
        if line.startswith(">"):
            if head is not None:
                out.append((head, "".join(seq)))
            head, seq = line[1:], []
        elif line:
            seq.append(line.strip())
    if head is not None:
        out.append((head, "".join(seq)))
    return out


def hmmer(out: Path) -> None:
    """Profiles from the references; every proteome scanned; all domain hits kept (filtered when scoring)."""
    import pyfamsa
    import pyhmmer

    todo = [n for n in PROTEOMES if not (out / "hmmer" / f"{n}.tsv").is_file()]
    if not todo:
        return
    alphabet = pyhmmer.easel.Alphabet.amino()
    builder, background = pyhmmer.plan7.Builder(alphabet), pyhmmer.plan7.Background(alphabet)
    by_label = defaultdict(list)
    for head, seq in _read_fasta((out / "data" / "refs.fasta").read_text().splitlines()):
        by_label[head.split()[1].split(".")[0]].append(seq)
    aligner, hmms = pyfamsa.Aligner(threads=2), []
    for label, seqs in sorted(by_label.items()):
        msa = aligner.align([pyfamsa.Sequence(f"s{i}".encode(), s.encode()) for i, s in enumerate(seqs)])
        rows = [pyhmmer.easel.TextSequence(name=g.id, sequence=g.sequence.decode()) for g in msa]
        hmm, _, _ = builder.build_msa(pyhmmer.easel.TextMSA(name=label.encode(), sequences=rows).digitize(alphabet), background)
        hmms.append(hmm)
    (out / "hmmer").mkdir(exist_ok=True)
    for name in todo:
        records = _read_fasta((out / "data" / f"{name}.fasta").read_text().splitlines())
        queries = [pyhmmer.easel.TextSequence(name=h.split()[0].encode(), sequence=s).digitize(alphabet) for h, s in records]
        rows = ["protein\tlabel\ti_evalue\tscore\tenv_from\tenv_to\n"]
        for hits in pyhmmer.hmmer.hmmscan(queries, hmms, cpus=2, E=10.0, domE=10.0):
            query = hits.query.name if hasattr(hits, "query") else hits.query_name
            query = query.decode() if isinstance(query, bytes) else query
            for hit in hits:
                label = hit.name.decode() if isinstance(hit.name, bytes) else hit.name
                for d in hit.domains:
                    rows.append(f"{query}\t{label}\t{d.i_evalue:.3g}\t{d.score:.1f}\t{d.env_from}\t{d.env_to}\n")
        (out / "hmmer" / f"{name}.tsv").write_text("".join(rows))
        print(f"hmmer {name}: {len(rows) - 1} domain hits", flush=True)


def distill(*args: str) -> None:
    cmd = [sys.executable, "-m", "distill", *args]
    print("$ distill " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def build_index(out: Path, variant: str, model: str, align: int) -> Path:
    index = out / f"index-{variant}"
    if not (index / "index.json").is_file():
        extra = ["--background", str(out / "data" / f"{BACKGROUND}.fasta")] if variant == "background" else []
        distill(
            "index", model, "--data", str(out / "data" / "refs.fasta"), "--task", "pfam", "--align", str(align), "-o", str(index), *extra
        )
    return index


HEADS = {"head-plain": [], "head": ["--background"]}  # the fine-tuned heads' variants: extra finetune options


def fine_tune(out: Path, variant: str, model: str) -> Path:
    run = out / f"finetune-{variant}"
    if not (run / "model" / "heads" / "pfam" / "labels.json").is_file():
        extra = ["--background", str(out / "data" / f"{BACKGROUND}.fasta")] if HEADS[variant] else []
        resume = ["--resume"] if (run / "checkpoint.json").is_file() else []
        distill(
            "finetune", model, "--data", str(out / "data" / "refs.fasta"), "--task", "pfam", "--out", str(run), "--quiet", *extra, *resume
        )
    return run / "model"


def annotate(out: Path, variant: str, model: str, name: str, index: Path | None = None) -> Path:
    """The proteome annotated with the index (``index``) or with a fine-tuned bundle as ``model``."""
    calls = out / f"calls-{variant}" / f"{name}.tsv"
    if not calls.is_file() or not json.loads(calls.with_name(calls.name + ".progress.json").read_text()).get("complete"):
        calls.parent.mkdir(exist_ok=True)
        resume = ["--resume"] if calls.with_name(calls.name + ".progress.json").is_file() else []
        reference = ["--reference", str(index)] if index is not None else []
        distill("annotate", str(out / "data" / f"{name}.fasta"), "--model", str(model), *reference, "-o", str(calls), "--quiet", *resume)
    return calls


def read_hmmer(path: Path) -> dict[str, list[tuple[str, float, int, int]]]:
    hits = defaultdict(list)
    with open(path) as f:
        for r in csv.DictReader(f, delimiter="\t"):
            hits[r["protein"]].append((r["label"], float(r["i_evalue"]), int(r["env_from"]), int(r["env_to"])))
    return hits


def overlap(a: tuple[int, int], b: tuple[int, int]) -> float:
    inter = min(a[1], b[1]) - max(a[0], b[0]) + 1
    return max(inter, 0) / max(min(a[1] - a[0] + 1, b[1] - b[0] + 1), 1)


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson interval of a proportion k / n."""
    if n == 0:
        return [0.0, 1.0]
    p, d = k / n, 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(float(c - h), 3), round(float(c + h), 3)]


def score(calls: Path, truth: dict, proteins: list[str], column: str = "ref_call") -> dict:
    """Protein-level calls (the TSV's ``column``: ref_call, or a head's pfam_label_1) and domain rows (the
    .domains.tsv, when written: the index's, or the head's for a head's column) against HMMER."""
    with open(calls) as f:
        rows = {r["id"]: r for r in csv.DictReader(f, delimiter="\t")}
    called = {p: rows[p][column] for p in proteins if rows.get(p, {}).get(column, "-") not in ("-", "")}
    labels_at = {e: {p: {h[0] for h in truth.get(p, []) if h[1] <= e} for p in proteins} for e in AGREE_EVALUES}
    assigned = [p for p in proteins if labels_at[1e-5][p]]
    res = {"proteins": len(proteins), "hmmer_assigned_1e-5": len(assigned), "calls": len(called)}
    for e in AGREE_EVALUES:
        agree = sum(called[p] in labels_at[e][p] for p in called)
        res[f"agree_{e:g}"] = agree / max(len(called), 1)
        res[f"agree_{e:g}_ci"] = wilson(agree, len(called))
    res["calls_on_hmmer_negative"] = sum(not labels_at[1e-2][p] for p in called)
    found = sum(called.get(p) in labels_at[1e-5][p] for p in assigned)
    res["recall_1e-5"], res["recall_1e-5_ci"] = found / max(len(assigned), 1), wilson(found, len(assigned))
    domains_path = calls.with_name(calls.name.removesuffix(".tsv") + ".domains.tsv")
    if domains_path.is_file():
        res |= score_domains(domains_path, truth, labels_at, assigned, "reference" if column == "ref_call" else column.split("_")[0])
    return res


def score_domains(path: Path, truth: dict, labels_at: dict, assigned: list[str], source: str = "reference") -> dict:
    with open(path) as f:  # tables written before heads scanned have no source column: all rows are the index's
        doms = [r for r in csv.DictReader(f, delimiter="\t") if r["verdict"] == "call" and r.get("source", "reference") == source]
    agreed = [d for d in doms if d["label"] in labels_at[1e-2].get(d["id"], set())]
    good = 0
    for d in agreed:
        span = (int(d["start"]), int(d["end"]))
        good += any(h[0] == d["label"] and h[1] <= 1e-2 and overlap(span, (h[2], h[3])) >= OVERLAP for h in truth[d["id"]])
    found = {d["id"] for d in agreed}
    return {"domain_calls": len(doms), "domain_agree_0.01": len(agreed) / max(len(doms), 1),
            "domain_overlap_50": good / max(len(agreed), 1),
            "domain_protein_recall_1e-5": sum(p in found for p in assigned) / max(len(assigned), 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="random:small")
    ap.add_argument("--per-family", type=int, default=200)
    ap.add_argument("--align", type=int, default=200)
    ap.add_argument("--report", default="ecoli,kuenenia", help="proteomes to score besides the development one")
    ap.add_argument("--variants", default="plain,background,head-plain,head")
    ap.add_argument("--stages", default="data,hmmer,index,finetune,annotate,score")
    a = ap.parse_args()
    stages = a.stages.split(",")
    if "data" in stages:
        prepare(a.out, a.per_family)
    if "hmmer" in stages:
        hmmer(a.out)
    names = [DEVELOPMENT, *[n for n in a.report.split(",") if n]]
    results = {}
    for variant in a.variants.split(","):
        head = variant in HEADS
        if head:
            model, index = fine_tune(a.out, variant, a.model) if "finetune" in stages else a.out / f"finetune-{variant}" / "model", None
        else:
            model, index = a.model, build_index(a.out, variant, a.model, a.align) if "index" in stages else None
        for name in names:
            calls = annotate(a.out, variant, model, name, index) if "annotate" in stages else a.out / f"calls-{variant}" / f"{name}.tsv"
            if "score" in stages and calls.is_file():
                proteins = [h.split()[0] for h, _ in _read_fasta((a.out / "data" / f"{name}.fasta").read_text().splitlines())]
                truth = read_hmmer(a.out / "hmmer" / f"{name}.tsv")
                results[f"{variant}/{name}"] = r = score(calls, truth, proteins, "pfam_label_1" if head else "ref_call")
                print(variant, name, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    if results:
        (a.out / f"results-{'-'.join(a.variants.split(','))}.json").write_text(json.dumps(results, indent=1))
        print(table(results))


def table(results: dict) -> str:
    """The markdown table of docs/results.md."""
    rows = ["| calls by | proteome | calls | agree with HMMER (i-E <= 0.01) [95% CI] | at <= 1e-5 | calls on HMMER-negative proteins "
            "| recall of HMMER's <= 1e-5 proteins [95% CI] | domain calls | domains overlapping HMMER's envelope >= 50% |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, r in results.items():
        variant, name = key.split("/")
        ci, rci = r["agree_0.01_ci"], r["recall_1e-5_ci"]
        domains = f"{r['domain_calls']} | {r['domain_overlap_50']:.3f}" if "domain_calls" in r else " | "  # none before domains
        rows.append(f"| {variant} | {name} | {r['calls']} | {r['agree_0.01']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {r['agree_1e-05']:.3f} "
                    f"| {r['calls_on_hmmer_negative']} | {r['recall_1e-5']:.3f} [{rci[0]:.3f}, {rci[1]:.3f}] | {domains} |")  # fmt: skip
    return "\n".join(rows)


if __name__ == "__main__":
    main()
