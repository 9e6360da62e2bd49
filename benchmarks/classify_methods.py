"""The methods of benchmarks/classify_vs_hmmer.py: each trains on d["train"] and predicts d["test"] and d["negatives"]."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Result:
    pred: list[str]
    scores: np.ndarray  # top score per test sequence (probability, bit score, alignment score, cosine)
    negative_scores: np.ndarray
    train_seconds: float
    predict_seconds: float  # test sequences only
    threshold: float | None = None  # the product's calibrated no-call threshold
    scaling: dict = field(default_factory=dict)  # how prediction cost grows with the number of classes
    extra: dict = field(default_factory=dict)  # more columns for the row

    def scale_to(self, classes_to: int, classes_now: int) -> float:
        """Factor on seq/s when the label set grows to ``classes_to`` (see the module docstring of the benchmark)."""
        kind = self.scaling["kind"]
        if kind == "affine":  # per query: fixed cost + cost per profile / reference, fitted on two database sizes
            a, b = self.scaling["fixed_s"], self.scaling["per_class_s"]
            return (a + b * classes_now) / (a + b * classes_to)
        if kind == "head":  # fixed encoder cost + dim x classes multiply-adds
            enc, dim = self.scaling["encoder_macs"], self.scaling["dim"]
            return (enc + dim * classes_now) / (enc + dim * classes_to)
        # index: embed (fixed) + flat search (proportional to references) + alignment (fixed)
        fixed, search = self.scaling["fixed_s"], self.scaling["search_s"]
        return (fixed + search) / (fixed + search * classes_to / classes_now)


def shrink(d: dict, n_classes: int, out: Path) -> dict:
    """The first ``n_classes`` labels only (--quick), the training part written to ``out`` for the product's commands."""
    keep = set(sorted(set(d["train"].labels))[:n_classes])

    def pick(ds):  # noqa: ANN001, ANN202
        return ds.subset([i for i, label in enumerate(ds.labels) if label in keep])

    train = pick(d["train"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{d['task']}_train_quick.fasta"
    path.write_text("".join(f">{i} {g}\n{s}\n" for i, g, s in zip(train.ids, train.groups, train.sequences, strict=True)))
    return d | {"train": train, "test": pick(d["test"]), "negatives": d["negatives"][:20], "train_path": str(path)}


# ---- alignment tools ------------------------------------------------------------------------------


def hmmer(d: dict) -> Result:
    import pyfamsa
    import pyhmmer

    alphabet = pyhmmer.easel.Alphabet.amino()
    builder, background = pyhmmer.plan7.Builder(alphabet), pyhmmer.plan7.Background(alphabet)
    t = time.perf_counter()
    by_class = defaultdict(list)
    for rid, seq, label in zip(d["train"].ids, d["train"].sequences, d["train"].labels, strict=True):
        by_class[label].append((rid, seq))
    aligner, hmms = pyfamsa.Aligner(threads=2), []
    for label, members in sorted(by_class.items()):
        if len(members) > 1:
            msa = aligner.align([pyfamsa.Sequence(f"s{i}".encode(), s.encode()) for i, (_, s) in enumerate(members)])
            rows = [pyhmmer.easel.TextSequence(name=g.id, sequence=g.sequence.decode()) for g in msa]
        else:
            rows = [pyhmmer.easel.TextSequence(name=b"s0", sequence=members[0][1])]
        text = pyhmmer.easel.TextMSA(name=label.encode(), sequences=rows)
        hmm, _, _ = builder.build_msa(text.digitize(alphabet), background)
        hmms.append(hmm)
    train_s = time.perf_counter() - t

    def scan(seqs: list[str]) -> tuple[list[str], np.ndarray]:
        queries = [pyhmmer.easel.TextSequence(name=str(i).encode(), sequence=s).digitize(alphabet) for i, s in enumerate(seqs)]
        pred, best = ["-"] * len(seqs), np.full(len(seqs), -np.inf)
        for i, hits in enumerate(pyhmmer.hmmer.hmmscan(queries, hmms, cpus=2)):
            if len(hits):
                top = max(hits, key=lambda h: h.score)
                name = top.name if isinstance(top.name, str) else top.name.decode()
                pred[i], best[i] = name, top.score
        return pred, best

    pred, scores, predict_s, negative_scores = timed(scan, d)
    half = hmms[: len(hmms) // 2]
    t = time.perf_counter()
    for _ in pyhmmer.hmmer.hmmscan(
        [pyhmmer.easel.TextSequence(name=b"q", sequence=s).digitize(alphabet) for s in d["test"].sequences], half, cpus=2
    ):
        pass
    scaling = affine(time.perf_counter() - t, len(half), predict_s, len(hmms), len(d["test"]))
    return Result(pred, scores, negative_scores, train_s, predict_s, scaling=scaling)


def timed(predict, d: dict) -> tuple[list[str], np.ndarray, float, np.ndarray]:  # noqa: ANN001
    """Predictions and scores for the test set (timed), then the negatives' scores (untimed)."""
    t = time.perf_counter()
    pred, scores = predict(d["test"].sequences)
    seconds = time.perf_counter() - t
    return pred, scores, seconds, predict(d["negatives"])[1]


def affine(t_small: float, n_small: int, t_big: float, n_big: int, n_queries: int) -> dict:
    """Per-query time = a + b * database size, from two timed sizes (a clamped at 0)."""
    b = max(t_big - t_small, 0.0) / (n_big - n_small) / n_queries
    return {"kind": "affine", "fixed_s": max(t_big / n_queries - b * n_big, 0.0), "per_class_s": b}


def nearest_neighbour(d: dict, vote: bool = False) -> Result:
    """The best-scoring training sequence's label; ``vote``: the product's rule over every training sequence instead
    (E-values, evidence vote of the best three per class: distill.inference.align), the ceiling of an index's candidates."""
    from distill.inference.align import Aligner, evidence
    from distill.inference.align import vote as evidence_vote

    t = time.perf_counter()
    aligner = Aligner(d["train"].sequences, threads=2)
    train_s = time.perf_counter() - t
    everything = np.arange(len(d["train"]))
    lengths = np.array([len(s) for s in d["train"].sequences])

    def search(seqs: list[str]) -> tuple[list[str], np.ndarray]:
        pred, best = [], np.zeros(len(seqs))
        for i, s in enumerate(seqs):
            scores = aligner.scores(s, everything)
            if vote:
                e = evidence(scores, len(s), lengths)
                order = np.argsort(-e, kind="stable")
                label, best[i] = evidence_vote([d["train"].labels[j] for j in order], e[order])
                pred.append(label)
                continue
            j = int(np.argmax(scores))
            pred.append(d["train"].labels[j])
            best[i] = scores[j]
        return pred, best

    pred, scores, predict_s, negative_scores = timed(search, d)
    half = everything[: len(everything) // 2]
    t = time.perf_counter()
    for s in d["test"].sequences:
        aligner.scores(s, half)
    # references grow with the classes (same references per class): per-class cost = per-reference cost x refs/class
    scaling = affine(time.perf_counter() - t, len(half), predict_s, len(everything), len(d["test"]))
    classes = len(set(d["train"].labels))
    scaling["per_class_s"] *= len(everything) / classes
    return Result(pred, scores, negative_scores, train_s, predict_s, scaling=scaling)


# ---- the product ----------------------------------------------------------------------------------


def linear_probe(d: dict, out: Path) -> Result:
    from distill.inference.embeddings import featurizer
    from distill.recipes.probe import train_head

    feat = featurizer("random:small")
    labels = sorted(set(d["train"].labels))
    y = np.array([labels.index(label) for label in d["train"].labels])
    t = time.perf_counter()
    head, _ = train_head(feat.features(d["train"].sequences, max_tokens=8192), y, len(labels))
    train_s = time.perf_counter() - t
    import torch

    def predict(seqs: list[str]) -> tuple[list[str], np.ndarray]:
        with torch.no_grad():
            p = torch.softmax(head(torch.from_numpy(feat.features(seqs, max_tokens=8192))), -1).numpy()
        return [labels[i] for i in p.argmax(1)], p.max(1)

    t = time.perf_counter()
    pred, scores = predict(d["test"].sequences)
    predict_s = time.perf_counter() - t  # includes embedding (the cache is cold for the test set)
    return Result(
        pred,
        scores,
        predict(d["negatives"])[1],
        train_s,
        predict_s,
        scaling={"kind": "head", "encoder_macs": _encoder_macs(feat.model, d), "dim": feat.dim},
    )


def _encoder_macs(model, d: dict) -> float:  # noqa: ANN001
    """Multiply-adds of one forward pass over a test sequence of mean length (weights x tokens)."""
    tokens = np.mean([min(len(s), 1022) + 2 for s in d["test"].sequences])
    return float(model.num_parameters() * tokens)


def finetune_settings(task: str, quick: bool) -> dict:
    """Fixed before scoring the test set (from validation behaviour of the first Pfam runs); SCOPe gets fewer epochs."""
    if quick:
        return {"small": {"epochs": 1, "lr": 2e-3}}
    if task == "pfam":
        return {"small": {"epochs": 8, "lr": 2e-3}, "medium": {"epochs": 8, "lr": 1e-3}}  # medium: 4 left validation rising
    return {"small": {"epochs": 3, "lr": 2e-3}}  # ~3 min an epoch here; fine-tuning alone does not learn SCOPe on a CPU budget


def finetuned(d: dict, run: Path, model: str, seed: int, settings: dict, teacher: Path | None = None) -> Result:
    from distill.core.config import FinetuneConfig
    from distill.inference import resolve
    from distill.recipes.finetune import finetune

    t = time.perf_counter()
    # class weights none: what the recorded figures used (the default became auto, which picks per data set)
    cfg = FinetuneConfig(
        model, [d["train_path"]], d["task"], str(run), seed=seed, teacher=str(teacher) if teacher else None, quiet=True,
        class_weights="none", **settings,
    )  # fmt: skip
    resumed = (run / "checkpoint.json").is_file()
    result = finetune(cfg, resume=resumed)
    train_s = time.perf_counter() - t
    if resumed:  # a run finished (or interrupted) earlier: its own wall time, from its directory (pauses included)
        train_s = (run / "metrics.jsonl").stat().st_mtime - (run / "config.json").stat().st_mtime
    embedder = resolve(str(result.bundle), providers="cpu")
    labels = embedder.labels[d["task"]]

    def predict(seqs: list[str]) -> tuple[list[str], np.ndarray]:
        p = embedder.run([s[:1022] for s in seqs], [d["task"]])[1][d["task"]]
        return [labels[i] for i in p.argmax(1)], p.max(1)

    t = time.perf_counter()
    pred, scores = predict(d["test"].sequences)
    predict_s = time.perf_counter() - t
    scaling = {"kind": "head", "encoder_macs": _encoder_macs(embedder.backend.model, d), "dim": embedder.dim}
    return Result(pred, scores, predict(d["negatives"])[1], train_s, predict_s, embedder.thresholds[d["task"]], scaling)


def _search_costs(index: Any, model: Any, seqs: list[str], predict_s: float) -> dict[str, float]:
    """Which part of ``predict_s`` grows with the reference count: the flat cosine search and the 3-mer search (both
    over every reference), timed alone afterwards; the rest (embedding, alignment of a fixed number) does not."""
    from distill.inference.embeddings import embed
    from distill.inference.kmers import KmerIndex

    vectors = embed(model, seqs, index.card["pooling"], 8192)
    t = time.perf_counter()
    index.search(vectors, 1)
    search_s = time.perf_counter() - t
    if index.align and index.card.get("kmer"):
        kmers = KmerIndex(index.sequences, int(index.card["kmer"]))
        t = time.perf_counter()
        kmers.search([s.upper() for s in seqs], index.align)
        search_s += time.perf_counter() - t
    return {"fixed_s": max(predict_s - search_s, 0.0), "search_s": search_s}


def reference(d: dict, index_dir: Path, bundle: Path | str, align: int, kmer: bool = True) -> Result:
    """``distill index`` over the training set with ``bundle`` (any model spec), then nearest-reference calls;
    ``kmer``: the re-ranked candidates also come from shared 3-mers (`distill index --kmer`, the default)."""
    from rich.console import Console

    from distill.inference.embeddings import embed
    from distill.inference.index import load_index
    from distill.recipes.index_build import index_command

    t = time.perf_counter()
    if not (index_dir / "index.json").is_file():
        index_command(str(bundle), [d["train_path"]], d["task"], index_dir, False, None, "", 0.99, 8192, "cpu", Console(quiet=True), align,
                      kmer=kmer)  # fmt: skip
    train_s = time.perf_counter() - t
    index = load_index(index_dir)
    from distill.inference.encoders import load_encoder

    model = load_encoder(str(bundle)).model.eval()

    def predict(seqs: list[str]) -> tuple[list[str], np.ndarray]:
        nn = index.search(embed(model, seqs, index.card["pooling"], 8192), 1, [s.upper() for s in seqs])
        return nn.calls, nn.call_scores

    t = time.perf_counter()
    pred, scores = predict(d["test"].sequences)
    predict_s = time.perf_counter() - t
    scaling = {"kind": "index", **_search_costs(index, model, d["test"].sequences, predict_s)}
    negative_scores = predict(d["negatives"])[1]
    result = Result(pred, scores, negative_scores, train_s, predict_s, index.threshold, scaling)
    result.extra = {"leave_one_out_accuracy": index.card["calibration"]["leave_one_out_accuracy"]}  # the validation signal
    return result
