"""The fine-tuning recipe: encoder + classification head trained end to end on labelled sequences.

    FinetuneConfig -> setup (encoder from any model spec, head, optional task teacher) -> data (labelled files,
    stratified validation part, keyed crops) -> the linear probe as "epoch 0" -> AdamW + warm-up/cosine -> for each
    epoch: train, validate (accuracy, macro-F1), checkpoint -> best epoch -> (small sets) k folds, each scoring its
    left-out sequences with its probe and its fine-tune -> keep the probe or the fine-tune -> calibrate
    (temperature, no-call threshold) -> bundle

Loss: cross-entropy on the head's logits (optionally class-weighted), or with ``--teacher`` task distillation
``(1 - lam) * CE + lam * T^2 * KL(teacher/T || student/T)``: a fine-tuned larger model's calls as soft targets.

Run directory::

    RUN/config.json         the resolved config (a resumed run must match it)
    RUN/metrics.jsonl       one row per epoch
    RUN/checkpoint.json     points at the latest complete epoch checkpoint (distill.recipes.checkpoints)
    RUN/checkpoints/epoch-N/{model,head}.safetensors + state.pt (optimizer, scheduler, counters)
    RUN/probe/              encoder + head weights of the linear probe baseline
    RUN/best/               encoder + head weights of the best validation epoch so far
    RUN/folds/K/            the k-fold runs, each a run directory of its own + scores.npz (small data sets)
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
from distill.core.config import FinetuneConfig
from distill.core.distributed import Distributed, StopRequested, pick_device
from distill.core.heads import Head, ProbeHead
from distill.core.io import atomic_write_json
from distill.core.losses import kl_sum, mix
from distill.core.model import ESM, pooled_embedding
from distill.inference.embeddings import embed
from distill.inference.encoders import Encoder, load_encoder
from distill.recipes.checkpoints import changed_options, jsonl_truncate, load_checkpoint, load_weights, save_checkpoint, save_weights
from distill.recipes.finetune_calibration import calibrate_head
from distill.recipes.finetune_data import Data, setup_data, step_examples, teacher_logits
from distill.recipes.finetune_fallback import KINDS, fit_probe, oof_f1, probe_kept, refit_probe, report
from distill.recipes.finetune_folds import folds_for, out_of_fold
from distill.recipes.outline import adamw, optimizer_step, warmup_cosine
from distill.recipes.probe import choose_class_weights, classification_metrics

RESUME_OVERRIDABLE = {"quiet", "device"}  # what a resumed run may change
COSINE_SCALE = 16.0  # logit scale of the cosine head: softmax can reach ~1 - 1e-6 over hundreds of classes


# ---- setup ----------------------------------------------------------------------------------------


def probe_scale(cfg: FinetuneConfig) -> float:
    """The probe baseline is `distill probe`'s linear head; with LP-FT it takes the form of the head training starts from."""
    return COSINE_SCALE if cfg.lp_ft and cfg.head == "cosine" else 0.0


def build_head(encoder: ESM, cfg: FinetuneConfig, n_classes: int) -> ProbeHead:
    torch.manual_seed(cfg.seed)
    head = ProbeHead(encoder.cfg.dim, n_classes, 0, COSINE_SCALE if cfg.head == "cosine" else 0.0)
    return head  # mean 0 / scale 1: the encoder learns its own scale; standardising is for frozen features


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
    return valid_metrics(logits_of(model, head, d.valid.sequences, cfg, device), d)


def valid_metrics(logits: np.ndarray, d: Data) -> dict[str, float]:
    """Validation loss, accuracy and F1 of the validation part's logits."""
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
    for note in d.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    run = train_run(cfg, d, resume, console, dist, device, stop_after)
    folds, oof = folds_for(cfg, d), None
    if not run.stopped and folds:
        console.print(f"calibrating on {folds} folds: the recipe again on all folds but one, scoring the one left out")
        oof = out_of_fold(cfg, d, folds, lambda c, fd: _fold_scorers(c, fd, dist, device, console))
        if oof is not None:  # the out-of-fold scores of every labelled sequence decide between probe and fine-tune
            run.counters["oof_f1"] = oof_f1(oof)
            oof = oof[KINDS[0] if probe_kept(run.counters) else KINDS[1]]
    if run.stopped or (folds and oof is None):
        console.print(f"stopped after epoch {run.counters['epoch']}" + (" of the main run" if folds else "") + "; continue with --resume")
        dist.close()
        return FinetuneResult(out, None, run.counters, d.notes)
    bundle = None
    if dist.main:
        run.head = load_kept(run, cfg, len(d.labels), "probe" if probe_kept(run.counters) else "best")
        if oof is not None and probe_kept(run.counters):  # a kept probe learns from every labelled sequence
            run.head = refit_probe(run.model, d, cfg, probe_scale(cfg))
        bundle = write_bundle(out, cfg, run, d, device, console, oof)
    dist.close()
    return FinetuneResult(out, bundle or out / "model", run.counters, d.notes)


@dataclass
class Run:
    encoder: Encoder
    model: ESM
    head: ProbeHead
    counters: dict[str, Any]
    stopped: bool  # by a signal or ``stop_after`` (resumable)


def train_run(cfg: FinetuneConfig, d: Data, resume: bool, console: Console, dist: Distributed, device: torch.device,
              stop_after: int | None = None) -> Run:  # fmt: skip
    """Encoder + head trained on ``d`` in ``cfg.out`` (from the linear probe with LP-FT)."""
    out = Path(cfg.out)
    encoder = load_encoder(cfg.model)
    model, head = encoder.model.float().to(device), build_head(encoder.model, cfg, len(d.labels)).to(device)
    opt, sched, n_frozen = make_optimizer(model, head, cfg, cfg.epochs * math.ceil(len(d.train) / cfg.batch_size))
    net = Classifier(model, head, cfg.pooling)
    net = torch.nn.parallel.DistributedDataParallel(net) if dist.world > 1 else net
    counts = np.bincount(d.y_train, minlength=len(d.labels))
    weights, why = choose_class_weights(cfg.class_weights, Counter(dict(zip(d.labels, counts.tolist(), strict=True))))
    weight = torch.from_numpy(len(d.y_train) / (len(d.labels) * counts)).float().to(device) if weights == "balanced" else None
    ctx = {"device": device, "dist": dist, "weight": weight, "soft": teacher_logits(cfg, d, device)}
    if not cfg.quiet:
        console.print(f"fine-tuning {encoder.name} on {cfg.task}: {len(d.labels)} classes, {len(d.train)} training and {len(d.valid)} "
                      f"validation sequences, {why}, {cfg.head} head" + (f", {n_frozen:,} parameters frozen" if n_frozen else "")
                      + (", from its linear probe (LP-FT)" if cfg.lp_ft else "") + (f", {dist.world} processes" if dist.world > 1 else ""))  # fmt: skip
    counters = {"epoch": 0, "best_f1": -1.0, "best_epoch": 0, "bad": 0}
    if resume or (out / "checkpoint.json").exists():  # a fold left by a stopped run resumes with it
        counters = resume_run(out, cfg, {"model": model, "head": head}, opt, sched)
        console.print(f"resuming {out} after epoch {counters['epoch']}")
    else:
        if dist.main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / "config.json", asdict(cfg))
            (out / "metrics.jsonl").write_text("")
        # every rank fits the same probe (keyed by the seed); rank 0 records it
        counters = probe_baseline(out, model, head, d, cfg, weights, (opt, sched) if dist.main else None, console)
    with StopRequested() as stop:
        while counters["epoch"] < cfg.epochs and counters["bad"] < cfg.patience and not stop.requested:
            train_loss = train_epoch(net, opt, sched, d, counters["epoch"], cfg, ctx)
            counters = end_epoch(out, model, head, opt, sched, d, cfg, counters, train_loss, console) if dist.main else counters
            counters = dist.broadcast(counters)
            stop.requested |= stop_after is not None and counters["epoch"] >= stop_after
            stop.requested = dist.sum([float(stop.requested)])[0] > 0
    return Run(encoder, model, head, counters, stop.requested)


def probe_baseline(out: Path, model: ESM, head: ProbeHead, d: Data, cfg: FinetuneConfig, weights: str, record: tuple | None,
                   console: Console) -> dict:  # fmt: skip
    """The linear probe of the frozen encoder (standardised features, as ``distill probe`` fits one) as "epoch 0", the
    best so far: fine-tuning must beat its validation macro-F1 to replace it, so a fine-tune never ends worse than the
    cheap baseline on validation. With LP-FT (Kumar et al. 2022) training also starts from its head."""
    device = next(model.parameters()).device
    xv = embed(model.eval(), d.valid.sequences, cfg.pooling, cfg.max_tokens, str(device))
    probe = fit_probe(model, d.train.sequences, d.y_train, len(d.labels), cfg, weights, probe_scale(cfg), (xv, d.y_valid))
    if cfg.lp_ft:
        head.load_state_dict(probe.state_dict())
    with torch.no_grad():  # the validation part's features are at hand: no second pass of the encoder
        metrics = valid_metrics(probe.eval()(torch.from_numpy(xv).to(device)).cpu().numpy(), d)
    # the fine-tune's own best (early stopping's patience counts against it, so a fresh head gets its epochs) and the probe's
    counters = {"epoch": 0, "best_f1": -1.0, "best_epoch": 0, "bad": 0, "probe_f1": metrics["valid_f1_macro"]}
    if record is not None:  # (optimizer, schedule) on the rank that writes
        save_weights(out / "probe", {"model": model, "head": probe})
        _log_epoch(out, console, counters, float("nan"), metrics, cfg.quiet)
        save_checkpoint(out, "epoch-0000", {"model": model, "head": head}, *record, counters)
    return counters


def load_kept(run: Run, cfg: FinetuneConfig, n_classes: int, which: str) -> ProbeHead:
    """The run directory's ``probe`` or ``best`` weights loaded into the run's encoder; returns the head of that form."""
    head = run.head if which == "best" else ProbeHead(run.model.cfg.dim, n_classes, 0, probe_scale(cfg))
    load_weights(Path(cfg.out) / which, {"model": run.model, "head": head})
    return head.to(next(run.model.parameters()).device)


def _fold_scorers(cfg: FinetuneConfig, d: Data, dist: Distributed, device: torch.device, console: Console):
    """One fold of the k-fold calibration: the recipe on the fold's data; the logits functions of its probe baseline
    and of its best fine-tuning epoch, so both kinds a bundle can keep get out-of-fold scores."""
    run = train_run(cfg, d, False, console, dist, device)
    if run.stopped:
        return None

    def scorer(weights: str):
        def score(seqs: list[str]) -> np.ndarray:  # both kinds share the fold's encoder: each call loads its own weights
            return logits_of(run.model, load_kept(run, cfg, len(d.labels), weights), seqs, cfg, device)

        return score

    return {kind: scorer(weights) for kind, weights in zip(KINDS, ("probe", "best"), strict=True)}


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
    counters = counters | {"epoch": counters["epoch"] + 1, "best_f1": max(counters["best_f1"], metrics["valid_f1_macro"]),
                           "best_epoch": counters["epoch"] + 1 if improved else counters["best_epoch"], "bad": 0 if improved else counters["bad"] + 1}  # fmt: skip
    _log_epoch(out, console, counters, train_loss, metrics, cfg.quiet)
    save_checkpoint(out, f"epoch-{counters['epoch']:04d}", {"model": model, "head": head}, opt, sched, counters)
    return counters


def _log_epoch(out: Path, console: Console, counters: dict, train_loss: float, metrics: dict, quiet: bool) -> None:
    row = {"epoch": counters["epoch"], "train_loss": train_loss if counters["epoch"] else None, **metrics}
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    if not quiet and counters["epoch"] == 0:
        console.print(f"linear probe on the frozen encoder: valid loss {metrics['valid_loss']:.4f}, accuracy {metrics['valid_accuracy']:.4f}, "
                      f"macro-F1 {metrics['valid_f1_macro']:.4f}")  # fmt: skip
    elif not quiet:
        console.print(f"epoch {row['epoch']}: train loss {train_loss:.4f}, valid loss {metrics['valid_loss']:.4f}, "
                      f"accuracy {metrics['valid_accuracy']:.4f}, macro-F1 {metrics['valid_f1_macro']:.4f}")  # fmt: skip


def write_bundle(out: Path, cfg: FinetuneConfig, run: Run, d: Data, device: torch.device, console: Console,
                 oof: dict[str, np.ndarray] | None = None) -> Path:  # fmt: skip
    """Calibrate the kept head (on the kept kind's out-of-fold scores when given, else distill.recipes.finetune_calibration),
    then write the bundle with that one head."""
    encoder, model, head, counters = run.encoder, run.model, run.head, run.counters
    calibration, scored = calibrate_head(lambda seqs: logits_of(model, head, seqs, cfg, device), d, cfg, oof)
    head.temperature.fill_(calibration["temperature"])
    truth = d.y_valid if oof is None else oof["y"]  # out of fold: the kept kind's estimate on every labelled sequence
    metrics = classification_metrics(truth, scored.argmax(1)) | {"classes": len(d.labels), "n_train": len(d.train), "n_valid": len(truth),
                                                                 "scored_on": calibration.get("pool", "validation")}  # fmt: skip
    kept = "probe" if probe_kept(counters) else "fine-tuned"
    card = {
        "task": cfg.task, "dim": model.cfg.dim, "hidden": 0, "pooling": cfg.pooling, "cosine_scale": head.cosine_scale,
        "protocol": {"kind": "fine-tuned", **{k: v for k, v in asdict(cfg).items() if k not in ("out", "quiet", "device")}},
        "metrics": metrics, "calibration": calibration, "parent": {"model": cfg.model, "fingerprint": encoder.fingerprint}, "kept": kept,
    }  # fmt: skip
    training = {"finetune": {"task": cfg.task, "parent": cfg.model, "parent_fingerprint": encoder.fingerprint, "best_epoch": counters["best_epoch"], "kept": kept},
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
    report(calibration, cfg, counters, console)
    atomic_write_json(out / "metrics.json", {"valid": metrics, "calibration": calibration, **counters})
    return bundle
