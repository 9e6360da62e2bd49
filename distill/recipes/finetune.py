"""The fine-tuning recipe: encoder + classification head trained end to end on labelled sequences.

    FinetuneConfig -> setup (encoder from any model spec, head, optional task teacher) -> data (labelled files,
    stratified validation part, keyed crops) -> AdamW + warm-up/cosine -> for each epoch: train, validate
    (accuracy, macro-F1), checkpoint -> best epoch -> calibrate (temperature, no-call threshold) -> bundle

Loss: cross-entropy on the head's logits (optionally class-weighted), or with ``--teacher`` task distillation
``(1 - lam) * CE + lam * T^2 * KL(teacher/T || student/T)``: a fine-tuned larger model's calls as soft targets.

Run directory::

    RUN/config.json         the resolved config (a resumed run must match it)
    RUN/metrics.jsonl       one row per epoch
    RUN/checkpoint.json     points at the latest complete epoch checkpoint (distill.recipes.checkpoints)
    RUN/checkpoints/epoch-N/{model,head}.safetensors + state.pt (optimizer, scheduler, counters)
    RUN/best/               encoder + head weights of the best validation epoch so far
    RUN/model/              the fine-tuned bundle: encoder + heads/<task>/ (calibrated)

All randomness is keyed by (seed, epoch, example), so ``--resume`` ends with the same weights as a run that was
never stopped.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape

from distill.core import data, tokens
from distill.core.bundle import save_bundle
from distill.core.calibration import describe
from distill.core.config import SCAN_WINDOW, FinetuneConfig
from distill.core.distributed import Distributed, StopRequested, pick_device
from distill.core.heads import Head, ProbeHead, heads_of
from distill.core.io import atomic_write_json
from distill.core.losses import kl_sum, mix
from distill.core.model import ESM, pooled_embedding
from distill.inference.embeddings import embed
from distill.inference.encoders import Encoder, load_encoder
from distill.recipes.checkpoints import changed_options, jsonl_truncate, load_checkpoint, load_weights, save_checkpoint, save_weights
from distill.recipes.finetune_calibration import calibrate_head
from distill.recipes.finetune_data import Data, setup_data
from distill.recipes.outline import adamw, optimizer_step, warmup_cosine
from distill.recipes.probe import choose_class_weights, classification_metrics

RESUME_OVERRIDABLE = {"quiet", "device"}  # what a resumed run may change
COSINE_SCALE = 16.0  # logit scale of the cosine head: softmax can reach ~1 - 1e-6 over hundreds of classes


# ---- setup ----------------------------------------------------------------------------------------


def build_head(encoder: ESM, cfg: FinetuneConfig, n_classes: int) -> ProbeHead:
    torch.manual_seed(cfg.seed)
    head = ProbeHead(encoder.cfg.dim, n_classes, 0, COSINE_SCALE if cfg.head == "cosine" else 0.0)
    return head  # mean 0 / scale 1: the encoder learns its own scale; standardising is for frozen features


def teacher_logits(cfg: FinetuneConfig, d: Data, device: torch.device) -> torch.Tensor | None:
    """The task teacher's logits for every training sequence (leading crop), in the student's label order."""
    if cfg.teacher is None or cfg.lam == 0:
        return None
    teacher = load_encoder(cfg.teacher)
    head = heads_of(Path(cfg.teacher), teacher.model.cfg.dim).get(cfg.task) if Path(cfg.teacher).is_dir() else None
    if head is None:
        raise ValueError(f"--teacher {cfg.teacher} has no {cfg.task} head; fine-tune it first (distill finetune ... --task {cfg.task})")
    missing = sorted(set(d.labels) - set(head.labels))
    if missing:
        raise ValueError(f"--teacher's {cfg.task} head lacks {len(missing)} of the student's labels (first: {missing[0]})")
    feats = embed(teacher.model.to(device), d.train.sequences, head.pooling, cfg.max_tokens, str(device), teacher.name, cfg.quiet)
    with torch.no_grad():
        logits = head.module(torch.from_numpy(feats))
    return logits[:, [head.labels.index(label) for label in d.labels]]


# ---- train / validate -----------------------------------------------------------------------------


def pooled(model: ESM, toks: torch.Tensor, pooling: str) -> torch.Tensor:
    out = model(toks)
    return pooled_embedding(out, toks) if pooling == "mean" else out["representations"][:, 0]


def task_loss(
    logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, soft: torch.Tensor | None, cfg: FinetuneConfig
) -> torch.Tensor:
    """Summed over the micro-batch: CE, or (1-lam) CE + lam T^2 KL(teacher/T || student/T).

    Rows with ``y == -1`` are residue-shuffled negatives (Outlier Exposure, Hendrycks et al. 2019): their loss is
    the cross-entropy to the uniform distribution, ``logsumexp(z) - mean(z)``, weighted by ``cfg.negative_weight``.
    """
    neg = y < 0
    loss = cfg.negative_weight * (torch.logsumexp(logits[neg], -1) - logits[neg].mean(-1)).sum()
    logits, y = logits[~neg], y[~neg]
    ce = F.cross_entropy(logits, y, weight=weight, reduction="sum")
    if soft is None:
        return loss + ce
    return loss + mix(ce, kl_sum(logits, soft[~neg], cfg.temperature), cfg.lam, cfg.temperature)


def in_window(piece: np.ndarray, background: list[np.ndarray], rng: np.random.Generator, window: int = SCAN_WINDOW) -> np.ndarray:
    """A labelled piece as a scanning window sees it: a random ``window``-long part of a longer domain, or a shorter
    one at a random place between flanks cut from a background protein (a window of a real protein holds a domain
    and what surrounds it; trained on bare domains only, a head misreads such windows: docs/results.md)."""
    if len(piece) >= window:
        start = int(rng.integers(0, len(piece) - window + 1))
        return piece[start : start + window]
    protein = background[int(rng.integers(len(background)))]
    n = min(window - len(piece), len(protein))
    start = int(rng.integers(0, len(protein) - n + 1))
    flank, left = protein[start : start + n], int(rng.integers(0, n + 1))
    return np.concatenate([flank[:left], piece, flank[left:]])


def step_examples(
    seqs: list[np.ndarray], y: np.ndarray, step: np.ndarray, epoch: int, cfg: FinetuneConfig, background: list[np.ndarray] | None = None
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The step's keyed random crops, plus negatives (label -1): residue-shuffled copies of a ``negative_rate`` share
    of them and, with a background proteome, crops of its proteins for a ``background_rate`` share, each as long as a
    crop of the step (real non-member pieces of the lengths the head sees). With a background, a ``context_rate``
    share of the crops are first put in a scan window (``in_window``).

    Returns (crops, labels, training-set row of each example, for the teacher's logits; negatives reuse a row).
    """
    crops = [data.crop(seqs[i], np.random.default_rng([cfg.seed, epoch, int(i), 5])) for i in step]
    for k, i in enumerate(step if background else []):
        rng = np.random.default_rng([cfg.seed, epoch, int(i), 21])
        if rng.random() < cfg.context_rate:
            crops[k] = in_window(crops[k], background, rng)
    n_neg = int(round(cfg.negative_rate * len(step)))
    negs = [np.random.default_rng([cfg.seed, epoch, int(i), 9]).permutation(crops[k]) for k, i in enumerate(step[:n_neg])]
    n_bg = int(round(cfg.background_rate * len(step))) if background else 0
    for k in range(n_bg):
        rng = np.random.default_rng([cfg.seed, epoch, int(step[0]), k, 17])
        protein = background[int(rng.integers(len(background)))]
        n = min(len(crops[k % len(crops)]), len(protein))
        start = int(rng.integers(0, len(protein) - n + 1))
        negs.append(protein[start : start + n])
    rows = np.r_[step, step[:n_neg], np.resize(step, n_bg)]
    return crops + negs, np.r_[y[step], -np.ones(n_neg + n_bg, dtype=np.int64)], rows


class Classifier(torch.nn.Module):
    """Encoder + head as one module, so DistributedDataParallel sees (and all-reduces) both."""

    def __init__(self, model: ESM, head: ProbeHead, pooling: str):
        super().__init__()
        self.model, self.head, self.pooling = model, head, pooling

    def forward(self, toks: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=toks.device.type == "cuda"):
            return self.head(pooled(self.model, toks, self.pooling).float())


def train_epoch(net: torch.nn.Module, opt, sched, d: Data, epoch: int, cfg: FinetuneConfig, ctx: dict) -> float:
    """One pass over the training sequences in keyed, length-bucketed steps; returns the mean loss.

    Under torchrun each rank takes every ``world``-th example of a step (by length, so ranks get similar work);
    gradients are all-reduced once per step, and the loss is scaled so the result is the global-step mean.
    """
    net.train()
    dist, device = ctx["dist"], ctx["device"]
    seqs = [tokens.encode(s) for s in d.train.sequences]
    background = [tokens.encode(s) for s in d.background.negatives] if d.background else None
    lengths = np.array([min(len(s), tokens.MAX_RESIDUES) for s in seqs])
    total, n = 0.0, 0
    for step in data.plan_epoch(lengths, cfg.batch_size, cfg.seed, epoch):
        crops, y, rows = step_examples(seqs, d.y_train, step, epoch, cfg, background)
        mine = np.argsort([len(c) for c in crops], kind="stable")[dist.rank :: dist.world]
        scale = 1.0 if len(mine) else 0.0  # a rank without examples joins the all-reduce with a zero-weight pass
        mine = mine if len(mine) else np.array([0])
        groups = tokens.token_budget_groups(np.array([len(c) for c in crops]), mine, cfg.max_tokens)
        for j, group in enumerate(groups):
            sync = dist.world == 1 or j == len(groups) - 1
            with nullcontext() if sync else net.no_sync():
                logits = net(torch.from_numpy(tokens.pad_batch([crops[g] for g in group])).to(device))
                soft = ctx["soft"][torch.as_tensor(rows[group])].to(device) if ctx["soft"] is not None else None
                loss = task_loss(logits, torch.from_numpy(y[group]).to(device), ctx["weight"], soft, cfg) / len(step)
                (loss * scale * dist.world).backward()  # DDP averages over ranks; the step's loss is their sum
            total += loss.item() * len(step) * scale
        optimizer_step(net.parameters(), opt, sched, cfg.clip_norm)
        n += len(step)
    return dist.sum([total])[0] / max(n, 1)


@torch.no_grad()
def logits_of(model: ESM, head: ProbeHead, sequences: list[str], cfg: FinetuneConfig, device: torch.device) -> np.ndarray:
    feats = embed(model.eval(), sequences, cfg.pooling, cfg.max_tokens, str(device))
    return head.eval()(torch.from_numpy(feats)).numpy()


def validate(model: ESM, head: ProbeHead, d: Data, cfg: FinetuneConfig, device: torch.device) -> dict[str, float]:
    logits = logits_of(model, head, d.valid.sequences, cfg, device)
    loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(d.y_valid)))
    pred = [d.labels[i] for i in logits.argmax(1)]
    return {"valid_loss": loss, **{f"valid_{k}": v for k, v in classification_metrics(d.valid.labels, pred).items()}}


# ---- the recipe -----------------------------------------------------------------------------------


def make_optimizer(model: ESM, head: ProbeHead, cfg: FinetuneConfig, steps: int):
    # The masked-LM head (its own layers; the tied embedding is used) plays no part in classification: fixed, so
    # DDP does not wait for gradients that never come. The bundle keeps it as it was, for perplexity and export.
    for p in (*model.lm_head.dense.parameters(), *model.lm_head.layer_norm.parameters(), model.lm_head.bias):
        p.requires_grad_(False)
    frozen = freeze(model, cfg.freeze_layers)
    opt = adamw([*model.parameters(), *head.parameters()], cfg.lr, cfg.weight_decay)
    return opt, warmup_cosine(opt, max(1, steps // 20), steps), frozen


def freeze(model: ESM, n_layers: int) -> int:
    """Embeddings and the first ``n_layers`` blocks stop learning; returns how many parameters are frozen."""
    if n_layers > model.cfg.layers:
        raise ValueError(f"--freeze-layers {n_layers} exceeds the model's {model.cfg.layers} layers")
    if n_layers == 0:
        return 0
    parts = [model.embed_tokens, model.embed_positions, model.emb_layer_norm_before, *model.layers[:n_layers]]
    frozen = [p for part in parts if part is not None for p in part.parameters()]
    for p in frozen:
        p.requires_grad_(False)
    return sum(p.numel() for p in frozen)


@dataclass
class FinetuneResult:
    out: Path
    bundle: Path | None  # None when stopped early by a signal (resumable)
    metrics: dict[str, Any]
    notes: list[str]


def finetune(cfg: FinetuneConfig, resume: bool = False, console: Console | None = None, stop_after: int | None = None) -> FinetuneResult:
    """The recipe; ``stop_after`` ends this invocation (resumably) after that many epochs, like a kill would.

    Under torchrun every rank trains its share of each step; rank 0 validates, checkpoints and writes the bundle.
    """
    cfg.validate()
    dist = Distributed.from_env()
    console = console or Console(stderr=True, soft_wrap=True)
    console.quiet = console.quiet or not dist.main
    out, device = Path(cfg.out), pick_device(cfg.device, dist)
    if not resume and (out / "checkpoint.json").exists():
        raise FileExistsError(f"{out} holds a fine-tuning run; continue it with --resume or choose another --out")
    d = setup_data(cfg)
    encoder = load_encoder(cfg.model)
    model, head = encoder.model.float().to(device), build_head(encoder.model, cfg, len(d.labels)).to(device)
    opt, sched, n_frozen = make_optimizer(model, head, cfg, cfg.epochs * math.ceil(len(d.train) / cfg.batch_size))
    net = Classifier(model, head, cfg.pooling)
    net = torch.nn.parallel.DistributedDataParallel(net) if dist.world > 1 else net
    counts = np.bincount(d.y_train, minlength=len(d.labels))
    weights, why = choose_class_weights(cfg.class_weights, Counter(dict(zip(d.labels, counts.tolist(), strict=True))))
    weight = torch.from_numpy(len(d.y_train) / (len(d.labels) * counts)).float().to(device) if weights == "balanced" else None
    ctx = {"device": device, "dist": dist, "weight": weight, "soft": teacher_logits(cfg, d, device)}
    for note in d.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    console.print(f"fine-tuning {encoder.name} on {cfg.task}: {len(d.labels)} classes, {len(d.train)} training and {len(d.valid)} "
                  f"validation sequences, {why}, {cfg.head} head" + (f", {n_frozen:,} parameters frozen" if n_frozen else "")
                  + (f", {dist.world} processes" if dist.world > 1 else ""))  # fmt: skip
    counters = {"epoch": 0, "best_f1": -1.0, "best_epoch": 0, "bad": 0}
    if resume:
        counters = resume_run(out, cfg, {"model": model, "head": head}, opt, sched)
        console.print(f"resuming {out} after epoch {counters['epoch']}")
    elif dist.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", asdict(cfg))
        (out / "metrics.jsonl").write_text("")
    with StopRequested() as stop:
        while counters["epoch"] < cfg.epochs and counters["bad"] < cfg.patience and not stop.requested:
            train_loss = train_epoch(net, opt, sched, d, counters["epoch"], cfg, ctx)
            counters = end_epoch(out, model, head, opt, sched, d, cfg, counters, train_loss, console) if dist.main else counters
            counters = dist.broadcast(counters)
            stop.requested |= stop_after is not None and counters["epoch"] >= stop_after
            stop.requested = dist.sum([float(stop.requested)])[0] > 0
    if stop.requested:
        console.print(f"stopped after epoch {counters['epoch']}; continue with --resume")
        dist.close()
        return FinetuneResult(out, None, counters, d.notes)
    bundle = None
    if dist.main:
        load_weights(out / "best", {"model": model, "head": head})
        bundle = write_bundle(out, cfg, encoder, model, head, d, device, counters, console)
    dist.close()
    return FinetuneResult(out, bundle or out / "model", counters, d.notes)


def resume_run(out: Path, cfg: FinetuneConfig, modules: dict[str, torch.nn.Module], opt, sched) -> dict:
    """The counters of the last epoch checkpoint (weights, optimizer, schedule restored); the options must match."""
    if (out / "config.json").is_file() and (changed := changed_options(out, asdict(cfg), RESUME_OVERRIDABLE)):
        raise ValueError(f"--resume: these options differ from the run in {out}: {', '.join(changed)}; resume with the same options")
    counters = load_checkpoint(out, modules, opt, sched, "finetune")
    jsonl_truncate(out / "metrics.jsonl", "epoch", counters["epoch"])  # rows of an epoch whose checkpoint was not written
    return counters


def end_epoch(out: Path, model: ESM, head: ProbeHead, opt, sched, d: Data, cfg: FinetuneConfig, counters: dict,
              train_loss: float, console: Console) -> dict:  # fmt: skip
    """Validate, keep the best weights, log, checkpoint; returns the new counters."""
    metrics = validate(model, head, d, cfg, next(model.parameters()).device)
    improved = metrics["valid_f1_macro"] > counters["best_f1"]
    if improved:
        save_weights(out / "best", {"model": model, "head": head})
    counters = {"epoch": counters["epoch"] + 1, "best_f1": max(counters["best_f1"], metrics["valid_f1_macro"]),
                "best_epoch": counters["epoch"] + 1 if improved else counters["best_epoch"], "bad": 0 if improved else counters["bad"] + 1}  # fmt: skip
    _log_epoch(out, console, counters, train_loss, metrics, cfg.quiet)
    save_checkpoint(out, f"epoch-{counters['epoch']:04d}", {"model": model, "head": head}, opt, sched, counters)
    return counters


def _log_epoch(out: Path, console: Console, counters: dict, train_loss: float, metrics: dict, quiet: bool) -> None:
    row = {"epoch": counters["epoch"], "train_loss": train_loss, **metrics}
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    if not quiet:
        console.print(f"epoch {row['epoch']}: train loss {train_loss:.4f}, valid loss {metrics['valid_loss']:.4f}, "
                      f"accuracy {metrics['valid_accuracy']:.4f}, macro-F1 {metrics['valid_f1_macro']:.4f}")  # fmt: skip


def write_bundle(out: Path, cfg: FinetuneConfig, encoder: Encoder, model: ESM, head: ProbeHead, d: Data,
                 device: torch.device, counters: dict, console: Console) -> Path:  # fmt: skip
    """Calibrate the best epoch's head (distill.recipes.finetune_calibration), then write the bundle with that one head."""
    calibration, valid_logits = calibrate_head(lambda seqs: logits_of(model, head, seqs, cfg, device), d, cfg)
    head.temperature.fill_(calibration["temperature"])
    pred = [d.labels[i] for i in valid_logits.argmax(1)]
    metrics = classification_metrics(d.valid.labels, pred) | {"classes": len(d.labels), "n_train": len(d.train), "n_valid": len(d.valid)}
    card = {
        "task": cfg.task, "dim": model.cfg.dim, "hidden": 0, "pooling": cfg.pooling, "cosine_scale": head.cosine_scale,
        "protocol": {"kind": "fine-tuned", **{k: v for k, v in asdict(cfg).items() if k not in ("out", "quiet", "device")}},
        "metrics": metrics, "calibration": calibration, "parent": {"model": cfg.model, "fingerprint": encoder.fingerprint},
    }  # fmt: skip
    training = {"finetune": {"task": cfg.task, "parent": cfg.model, "parent_fingerprint": encoder.fingerprint, "best_epoch": counters["best_epoch"]},
                "parent_training": encoder.card.get("training", {})}  # fmt: skip
    bundle = out / "model"
    save_bundle(
        bundle, model.cpu(), encoder.card.get("preset"), training, data.sequence_digests([tokens.encode(s) for s in d.train.sequences])
    )
    Head(head.cpu().eval(), d.labels, card).save(bundle / "heads" / cfg.task)
    dropped = [t for t in encoder.heads if t != cfg.task]
    if dropped:
        console.print(f"[yellow]note:[/] the parent's {', '.join(dropped)} head(s) were probed on the old encoder and do not fit "
                      f"the fine-tuned one; not copied (probe again: distill probe {bundle} --task ...)")  # fmt: skip
    console.print(describe(calibration))
    if "background" in calibration:
        b = calibration["background"]
        console.print(f"background {escape(b['name'])}: {b['presumed_members']} presumed members; {b['proteins']} held-out proteins scanned "
                      f"in windows of {calibration['scan']['window']}, {b['raised']} labels' thresholds raised above their best non-member"
                      + (f", {len(b['uncallable'])} never called ({', '.join(b['uncallable'][:5])})" if b["uncallable"] else ""))  # fmt: skip
    if not calibration["reached"]:
        console.print(f"[yellow]warning:[/] no threshold reaches precision {cfg.target_precision} on validation + negatives, so every call "
                      "of this head is a no-call; add training data, train longer, or lower --target-precision")  # fmt: skip
    atomic_write_json(out / "metrics.json", {"valid": metrics, "calibration": calibration, **counters})
    return bundle
