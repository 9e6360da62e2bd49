"""`distill probe` and `distill evaluate`: frozen-embedding probes of several models under one stated protocol.

Data flow: labelled files -> LabelledSet -> one split for all models -> per model: cached embeddings -> head
-> metrics (+ perplexity on a shared held-out FASTA) -> one table (markdown, CSV, JSON) and the figures.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from distill.core import data, tokens
from distill.core.bundle import training_digests
from distill.core.calibration import probe_negatives, shuffled
from distill.core.config import ProbeConfig
from distill.core.io import atomic_write_json, atomic_write_text
from distill.core.labels import LabelledSet, read_labelled
from distill.inference.embeddings import Featurizer, featurizer, n_cropped
from distill.recipes import plots
from distill.recipes.perplexity import perplexity
from distill.recipes.probe import METRIC_COLUMNS, ProbeResult, Split, drop_rare, label_counts_line, make_split, run_probe

# Compact models a reviewer expects next to ours, used when their weights are in the torch hub cache.
ESM2_BASELINES = ("esm2_t6_8M_UR50D", "esm2_t12_35M_UR50D")


@dataclass
class Prepared:
    """The labelled data and the one split every model is probed on."""

    ds: LabelledSet
    split: Split
    test_ds: LabelledSet | None
    valid_ds: LabelledSet | None = None  # early stopping (--valid)


def prepare(cfg: ProbeConfig, console: Console) -> Prepared:
    labels = Path(cfg.labels) if cfg.labels else None
    rule = cfg.rule()
    ds = read_labelled(cfg.data, rule, labels)
    console.print(f"{cfg.task}: {label_counts_line(ds)} from {len(set(ds.sources))} file(s)")
    test_ds = read_labelled(cfg.test, rule, labels) if cfg.test else None
    valid_ds = read_labelled(cfg.valid, rule, labels) if cfg.valid else None
    if test_ds is None:
        split = make_split(ds, cfg.split, cfg.seed, cfg.test_fraction, cfg.min_per_class)
    else:
        keep, notes = drop_rare(ds, cfg.min_per_class)
        split = Split(keep, np.array([], dtype=np.int64), notes)
    for note in split.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    cropped = n_cropped(ds.sequences) + (n_cropped(test_ds.sequences) if test_ds else 0)
    if cropped:
        console.print(
            f"[yellow]note:[/] {cropped} sequences exceed {tokens.MAX_RESIDUES} residues; they are embedded on their leading {tokens.MAX_RESIDUES}"
        )
    return Prepared(ds, split, test_ds, valid_ds)


def overlap_warning(feat: Featurizer, prepared: Prepared) -> str | None:
    """How many test sequences the model saw in MLM training (bundles record digests of their training set)."""
    if not feat.source or not Path(feat.source).is_dir():
        return None
    seen = training_digests(Path(feat.source))
    if seen is None:
        return None
    test = prepared.test_ds.sequences if prepared.test_ds is not None else [prepared.ds.sequences[i] for i in prepared.split.test]
    digests = data.sequence_digests([tokens.encode(s) for s in test])
    n = int(np.isin(digests, seen).sum())
    if n == 0:
        return None
    return f"{n} of {len(test)} test sequences ({n / len(test):.1%}) occur in {feat.name}'s MLM training data"


def probe_one(
    feat: Featurizer,
    cfg: ProbeConfig,
    prepared: Prepared,
    console: Console,
    quiet: bool = False,
    calibrate: tuple[float, float] | None = None,
) -> tuple[ProbeResult, np.ndarray]:
    """One model's probe; ``calibrate`` (target precision, confidence) trains and calibrates a head to store."""
    warning = overlap_warning(feat, prepared)
    if warning:
        console.print(f"[yellow]warning:[/] {warning}")
    x = feat.features(prepared.ds.sequences, cfg.pooling, cfg.max_tokens, cfg.device, quiet=quiet)
    tx = feat.features(prepared.test_ds.sequences, cfg.pooling, cfg.max_tokens, cfg.device, quiet=quiet) if prepared.test_ds else None
    protocol = cfg.protocol() | {"model": feat.name, "model_fingerprint": feat.fingerprint}
    neg = None
    if calibrate:
        train = prepared.split.train[probe_negatives(len(prepared.split.train), cfg.seed)]  # sorted: both are
        neg = feat.features(
            shuffled([prepared.ds.sequences[i] for i in train], cfg.seed), cfg.pooling, cfg.max_tokens, cfg.device, quiet=quiet
        )
    valid = None
    if prepared.valid_ds is not None:
        valid = (feat.features(prepared.valid_ds.sequences, cfg.pooling, cfg.max_tokens, cfg.device, quiet=quiet), prepared.valid_ds)
    result = run_probe(x, prepared.ds, cfg.task, prepared.split, protocol, cfg.hidden, cfg.seed, tx, prepared.test_ds, neg,
                       class_weights=cfg.class_weights, valid=valid, negative_index=train if calibrate else None,
                       calibration=calibrate)  # fmt: skip
    result.head.card |= {"pooling": cfg.pooling, "model_fingerprint": feat.fingerprint}
    if warning:
        result.notes.append(warning)
    test_x = tx[result.test_index] if tx is not None else x[result.test_index]
    return result, test_x


def held_out_perplexity(feat: Featurizer, seqs: data.SequenceSet, cfg: ProbeConfig) -> float | None:
    if feat.model is None:
        return None
    ppl, _ = perplexity(feat.model, seqs, cfg.max_tokens, torch.device(cfg.device))
    return ppl


def available_esm2() -> list[str]:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return [name for name in ESM2_BASELINES if (hub / f"{name}.pt").is_file()]


def evaluate_models(
    specs: list[str],
    cfg: ProbeConfig,
    out: Path,
    console: Console,
    ppl_data: Path | None = None,
    baselines: bool = False,
    tsne_top: int = 10,
    names: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Probe every model on the same split; write results.{md,csv,json} and the figures into ``out``.

    ``names`` maps a spec to the name its row and panels carry (default: the model's architecture name), so runs of
    one architecture (a sweep's seeds and data sizes) stay apart."""
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare(cfg, console)
    specs = list(specs)
    if baselines:
        first = next((s for s in specs if Path(s).is_dir()), "small")
        specs += [f"random:{first}", "composition"]
        found = available_esm2()
        specs += found
        missing = [n for n in ESM2_BASELINES if n not in found]
        if missing:
            console.print(f"[yellow]note:[/] ESM-2 baselines {', '.join(missing)} are not in the torch hub cache; their rows are left out")
    ppl_set = data.load_fasta(ppl_data) if ppl_data else None
    rows, panels, confusions, ppl_points = [], {}, {}, {}
    for spec in specs:
        feat = featurizer(spec)
        console.print(f"probing {feat.name} ({feat.parameters / 1e6:.2f}M parameters, dim {feat.dim})")
        result, test_x = probe_one(feat, cfg, prepared, console)
        ppl = held_out_perplexity(feat, ppl_set, cfg) if ppl_set else None
        name = (names or {}).get(spec, feat.name)
        row = {"model": name, "spec": spec, "parameters": feat.parameters, **result.metrics, "perplexity": ppl, "notes": result.notes}
        rows.append(row)
        panels[name] = test_x
        confusions[name] = (result.y_true, result.y_pred)
        if ppl is not None:
            ppl_points[name] = (feat.parameters, ppl)
    first = rows[0]
    header = cfg.describe(first["classes"], first["n_train"], first["n_test"], first["class_weights"])
    write_tables(rows, header, out)
    # every model is scored on the same test set, so the last result's labels serve all panels
    plots.tsne_panels(panels, result.y_true, out / "tsne.png", top=tsne_top, seed=cfg.seed)
    plots.confusion_panels(confusions, out / "confusion.png")
    if ppl_points:
        plots.perplexity_vs_parameters(ppl_points, out / "perplexity.png")
    return rows


COLUMN_TITLES = {
    "accuracy": "Accuracy",
    "precision_macro": "Precision (macro)",
    "recall_macro": "Recall (macro)",
    "f1_macro": "F1 (macro)",
    "precision_weighted": "Precision (weighted)",
    "recall_weighted": "Recall (weighted)",
    "f1_weighted": "F1 (weighted)",
}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    cols = ["Model", "Parameters", *COLUMN_TITLES.values(), "Classes", "Test seqs", "Perplexity"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        ppl = f"{r['perplexity']:.2f}" if r.get("perplexity") is not None else "-"
        params = f"{r['parameters'] / 1e6:.2f}M" if r["parameters"] else "0"
        cells = [r["model"], params, *(f"{r[c]:.3f}" for c in METRIC_COLUMNS), str(r["classes"]), str(r["n_test"]), ppl]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_tables(rows: list[dict[str, Any]], header: str, out: Path) -> None:
    atomic_write_text(out / "results.md", header + "\n\n" + markdown_table(rows) + "\n")
    atomic_write_json(out / "results.json", {"protocol": header, "rows": rows})
    fields = ["model", "spec", "parameters", *METRIC_COLUMNS, "classes", "n_train", "n_test", "perplexity"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", buffer.getvalue())
