"""The fine-tuning recipe: encoder + classification head trained end to end on labelled sequences.

    FinetuneConfig -> setup (encoder from any model spec, head, optional task teacher) -> data (labelled files,
    stratified validation part, keyed crops) -> AdamW + warm-up/cosine -> for each epoch: train, validate
    (accuracy, macro-F1), checkpoint -> best epoch -> calibrate (temperature, no-call threshold) -> bundle

Loss: cross-entropy on the head's logits (optionally class-weighted), or with ``--teacher`` task distillation
``(1 - lam) * CE + lam * T^2 * KL(teacher/T || student/T)``: a fine-tuned larger model's calls as soft targets.

Run directory::

    RUN/config.json         the resolved config (a resumed run must match it)
    RUN/metrics.jsonl       one row per epoch
    RUN/checkpoint.json     points at the latest complete epoch checkpoint (model, head, optimizer, counters)
    RUN/best/               encoder + head weights of the best validation epoch so far
    RUN/model/              the fine-tuned bundle: encoder + heads/<task>/ (calibrated)

All randomness is keyed by (seed, epoch, example), so ``--resume`` ends with the same weights as a run that was
never stopped.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file, load_model, save_file, save_model

from distill import data, tokens
from distill.bundle import save_bundle
from distill.calibration import DEFAULT_TARGET_PRECISION, calibrate, shuffled
from distill.embeddings import POOLINGS, embed
from distill.encoders import Encoder, load_encoder
from distill.io import atomic_write_json, read_json_object
from distill.labels import LabelledSet, read_labelled
from distill.model import ESM, sequence_embedding
from distill.probe import Head, ProbeHead, classification_metrics
from distill.train import Distributed, StopRequested, lr_lambda, pick_device

CLASS_WEIGHTS = ("none", "balanced")
HEAD_KINDS = ("cosine", "linear")
RESUME_OVERRIDABLE = {"quiet", "device"}  # what a resumed run may change
COSINE_SCALE = 16.0  # logit scale of the cosine head: softmax can reach ~1 - 1e-6 over hundreds of classes


@dataclass
class FinetuneConfig:
    model: str  # bundle, random:PRESET[@SEED], fair-esm name or .pt
    data: list[str]
    task: str
    out: str
    valid: list[str] | None = None
    valid_fraction: float = 0.1  # per class, stratified; classes too small to spare one stay training-only
    labels: str | None = None  # id<TAB>label file for plain FASTA
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 32  # sequences per optimizer step
    max_tokens: int = 8192  # tokens per forward pass (micro-batch), as in `distill fit`
    freeze_layers: int = 0  # embeddings + the first N layers stay fixed
    pooling: str = "mean"
    head: str = "cosine"
    class_weights: str = "none"
    min_per_class: int = 2  # classes with fewer training sequences leave the label set (they become negatives)
    patience: int = 3  # epochs without a better validation macro-F1 before stopping
    negative_rate: float = 0.25  # residue-shuffled copies added per step, as a share of the step (0: none)
    negative_weight: float = 0.5  # weight of their loss towards the uniform distribution
    teacher: str | None = None  # a fine-tuned bundle with a head for the same task
    lam: float = 0.5
    temperature: float = 2.0
    target_precision: float = DEFAULT_TARGET_PRECISION
    seed: int = 0
    device: str = "auto"
    quiet: bool = False

    def validate(self) -> None:
        checks = [
            (self.pooling in POOLINGS, f"--pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}"),
            (self.head in HEAD_KINDS, f"--head must be one of {', '.join(HEAD_KINDS)}, got {self.head!r}"),
            (self.class_weights in CLASS_WEIGHTS, f"--class-weights must be one of {', '.join(CLASS_WEIGHTS)}, got {self.class_weights!r}"),
            (0 < self.valid_fraction < 1 or self.valid, f"--valid-fraction must be in (0, 1), got {self.valid_fraction}"),
            (0 <= self.lam <= 1, f"--lam must be in [0, 1], got {self.lam}"),
            (self.temperature > 0, f"--temperature must be positive, got {self.temperature}"),
            (0 < self.target_precision <= 1, f"--target-precision must be in (0, 1], got {self.target_precision}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (0 <= self.negative_rate <= 1, f"--negative-rate must be in [0, 1], got {self.negative_rate}"),
        ]
        checks += [(getattr(self, n) >= 1, f"--{n.replace('_', '-')} must be at least 1") for n in ("epochs", "batch_size", "patience")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class Data:
    train: LabelledSet
    valid: LabelledSet
    labels: list[str]
    y_train: np.ndarray
    y_valid: np.ndarray
    outside: list[str]  # sequences of classes outside the label set: negatives for the no-call
    notes: list[str] = field(default_factory=list)


# ---- setup ----------------------------------------------------------------------------------------


def stratified_valid(ds: LabelledSet, fraction: float, seed: int) -> np.ndarray:
    """Validation mask: ``floor(fraction * n)`` of each class (keyed shuffle), at least one left for training."""
    mask = np.zeros(len(ds), dtype=bool)
    labels = np.array(ds.labels)
    for k, label in enumerate(sorted(set(ds.labels))):
        members = np.flatnonzero(labels == label)
        take = min(int(fraction * len(members)), len(members) - 1)
        if take > 0:
            mask[np.random.default_rng([seed, k, 11]).permutation(members)[:take]] = True
    return mask


def setup_data(cfg: FinetuneConfig) -> Data:
    labels_file = Path(cfg.labels) if cfg.labels else None
    ds = read_labelled(cfg.data, cfg.task, labels_file)
    if cfg.valid:
        train, valid = ds, read_labelled(cfg.valid, cfg.task, labels_file)
    else:
        is_valid = stratified_valid(ds, cfg.valid_fraction, cfg.seed)
        train, valid = ds.subset(np.flatnonzero(~is_valid)), ds.subset(np.flatnonzero(is_valid))
    counts = train.counts()
    kept = sorted(label for label, n in counts.items() if n >= cfg.min_per_class)
    notes = []
    if len(counts) < 2:
        raise ValueError(f"{', '.join(cfg.data)}: only one class ({next(iter(counts))}); a classifier needs at least 2")
    if len(kept) < 2:
        raise ValueError(f"fewer than 2 classes have {cfg.min_per_class} training sequences; lower --min-per-class or add data")
    unknown = sorted(set(valid.labels) - set(counts))
    if cfg.valid and unknown:
        raise ValueError(f"--valid has labels absent from the training data: {', '.join(unknown[:5])}" + (" ..." if len(unknown) > 5 else ""))
    index = {label: i for i, label in enumerate(kept)}
    outside = [s for s, label in zip(train.sequences, train.labels, strict=True) if label not in index]
    outside += [s for s, label in zip(valid.sequences, valid.labels, strict=True) if label not in index]
    if len(kept) < len(counts):
        notes.append(f"{len(counts) - len(kept)} classes with fewer than {cfg.min_per_class} training sequences left the label set; "
                     f"their {len(outside)} sequences are no-call negatives")  # fmt: skip
    train = train.subset([i for i, label in enumerate(train.labels) if label in index])
    valid = valid.subset([i for i, label in enumerate(valid.labels) if label in index])
    if len(valid) == 0:
        raise ValueError("no validation sequences: give --valid FILE or raise --valid-fraction (classes need 1/fraction members)")
    y = [np.array([index[label] for label in s.labels], dtype=np.int64) for s in (train, valid)]
    return Data(train, valid, kept, y[0], y[1], outside, notes)


def build_head(encoder: ESM, cfg: FinetuneConfig, n_classes: int) -> ProbeHead:
    torch.manual_seed(cfg.seed)
    head = ProbeHead(encoder.cfg.dim, n_classes, 0, COSINE_SCALE if cfg.head == "cosine" else 0.0)
    return head  # mean 0 / scale 1: the encoder learns its own scale; standardising is for frozen features


def teacher_logits(cfg: FinetuneConfig, d: Data, device: torch.device) -> torch.Tensor | None:
    """The task teacher's logits for every training sequence (leading crop), in the student's label order."""
    if cfg.teacher is None or cfg.lam == 0:
        return None
    from distill.probe import heads_of

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
    reps = model(toks)["representations"]
    return sequence_embedding(reps, toks) if pooling == "mean" else reps[:, 0]


def task_loss(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, soft: torch.Tensor | None, cfg: FinetuneConfig) -> torch.Tensor:
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
    t = cfg.temperature
    kl = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(soft[~neg] / t, -1), log_target=True, reduction="sum")
    return loss + (1 - cfg.lam) * ce + cfg.lam * t * t * kl


def step_examples(seqs: list[np.ndarray], y: np.ndarray, step: np.ndarray, epoch: int, cfg: FinetuneConfig) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The step's keyed random crops, plus residue-shuffled copies of a ``negative_rate`` share of them (label -1).

    Returns (crops, labels, training-set row of each example, for the teacher's logits).
    """
    crops = [data.crop(seqs[i], np.random.default_rng([cfg.seed, epoch, int(i), 5])) for i in step]
    n_neg = int(round(cfg.negative_rate * len(step)))
    negs = [np.random.default_rng([cfg.seed, epoch, int(i), 9]).permutation(crops[k]) for k, i in enumerate(step[:n_neg])]
    return crops + negs, np.r_[y[step], -np.ones(n_neg, dtype=np.int64)], np.r_[step, step[:n_neg]]


def train_epoch(model: ESM, head: ProbeHead, opt, sched, d: Data, epoch: int, cfg: FinetuneConfig, ctx: dict) -> float:
    """One pass over the training sequences in keyed, length-bucketed steps; returns the mean loss."""
    model.train()
    head.train()
    seqs = [tokens.encode(s) for s in d.train.sequences]
    lengths = np.array([min(len(s), tokens.MAX_RESIDUES) for s in seqs])
    total, n = 0.0, 0
    for step in data.plan_epoch(lengths, cfg.batch_size, cfg.seed, epoch):
        crops, y, rows = step_examples(seqs, d.y_train, step, epoch, cfg)
        opt.zero_grad(set_to_none=True)
        for group in data.token_budget_groups(np.array([len(c) for c in crops]), np.arange(len(crops)), cfg.max_tokens):
            toks = tokens.pad_batch([crops[g] for g in group]).to(ctx["device"])
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ctx["device"].type == "cuda"):
                logits = head(pooled(model, toks, cfg.pooling).float())
            soft = ctx["soft"][torch.as_tensor(rows[group])].to(ctx["device"]) if ctx["soft"] is not None else None
            loss = task_loss(logits, torch.from_numpy(y[group]).to(ctx["device"]), ctx["weight"], soft, cfg) / len(step)
            loss.backward()
            total += loss.item() * len(step)
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(head.parameters()), 1.0)
        opt.step()
        sched.step()
        n += len(step)
    return total / max(n, 1)


@torch.no_grad()
def logits_of(model: ESM, head: ProbeHead, sequences: list[str], cfg: FinetuneConfig, device: torch.device) -> np.ndarray:
    feats = embed(model.eval(), sequences, cfg.pooling, cfg.max_tokens, str(device))
    return head.eval()(torch.from_numpy(feats)).numpy()


def validate(model: ESM, head: ProbeHead, d: Data, cfg: FinetuneConfig, device: torch.device) -> dict[str, float]:
    logits = logits_of(model, head, d.valid.sequences, cfg, device)
    loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(d.y_valid)))
    pred = [d.labels[i] for i in logits.argmax(1)]
    return {"valid_loss": loss, **{f"valid_{k}": v for k, v in classification_metrics(d.valid.labels, pred).items()}}


# ---- checkpoints ----------------------------------------------------------------------------------


def save_weights(directory: Path, model: ESM, head: ProbeHead) -> None:
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp / "head.safetensors"))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def load_weights(directory: Path, model: ESM, head: ProbeHead) -> None:
    try:
        load_model(model, str(directory / "model.safetensors"), strict=True)
        head.load_state_dict(load_file(str(directory / "head.safetensors")))
    except Exception as e:  # safetensors, shape and key errors mean the same to the user
        raise ValueError(f"{directory} is corrupt or does not match this run's model: {e}") from e


def save_checkpoint(out: Path, model: ESM, head: ProbeHead, opt, sched, counters: dict[str, Any]) -> None:
    save_weights(out / "last", model, head)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, out / "last" / "state.pt")
    atomic_write_json(out / "checkpoint.json", counters)


def resume_state(out: Path, cfg: FinetuneConfig, model: ESM, head: ProbeHead, opt, sched) -> dict[str, Any]:
    if not (out / "checkpoint.json").is_file():
        raise FileNotFoundError(f"{out} has no checkpoint.json: nothing to resume (was it a `distill finetune` run directory?)")
    saved, given = read_json_object(out / "config.json"), json.loads(json.dumps(asdict(cfg)))  # JSON round trip: lists, not tuples
    changed = sorted(k for k, v in given.items() if k not in RESUME_OVERRIDABLE and saved.get(k) != v)
    if changed:
        raise ValueError(f"--resume: these options differ from the run in {out}: {', '.join(changed)}; resume with the same options")
    load_weights(out / "last", model, head)
    state = torch.load(out / "last" / "state.pt", map_location="cpu", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return read_json_object(out / "checkpoint.json")


# ---- the recipe -----------------------------------------------------------------------------------


def make_optimizer(model: ESM, head: ProbeHead, cfg: FinetuneConfig, steps: int):
    frozen = freeze(model, cfg.freeze_layers)
    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(max(1, steps // 20), steps))
    return opt, sched, frozen


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
    """The recipe; ``stop_after`` ends this invocation (resumably) after that many epochs, like a kill would."""
    console = console or Console(stderr=True, soft_wrap=True)
    cfg.validate()
    out = Path(cfg.out)
    if not resume and (out / "checkpoint.json").exists():
        raise FileExistsError(f"{out} holds a fine-tuning run; continue it with --resume or choose another --out")
    device = pick_device(cfg.device, Distributed())
    d = setup_data(cfg)
    encoder = load_encoder(cfg.model)
    model, head = encoder.model.float().to(device), build_head(encoder.model, cfg, len(d.labels)).to(device)
    steps = cfg.epochs * math.ceil(len(d.train) / cfg.batch_size)
    opt, sched, n_frozen = make_optimizer(model, head, cfg, steps)
    counts = np.bincount(d.y_train, minlength=len(d.labels))
    weight = torch.from_numpy(len(d.y_train) / (len(d.labels) * counts)).float().to(device) if cfg.class_weights == "balanced" else None
    ctx = {"device": device, "weight": weight, "soft": teacher_logits(cfg, d, device)}
    for note in d.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"fine-tuning {encoder.name} on {cfg.task}: {len(d.labels)} classes, {len(d.train)} training and {len(d.valid)} "
                  f"validation sequences, {cfg.class_weights} class weights, {cfg.head} head" + (f", {n_frozen:,} parameters frozen" if n_frozen else ""))  # fmt: skip
    counters = {"epoch": 0, "best_f1": -1.0, "best_epoch": 0, "bad": 0}
    if resume:
        counters = resume_state(out, cfg, model, head, opt, sched)
        console.print(f"resuming {out} after epoch {counters['epoch']}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", asdict(cfg))
        (out / "metrics.jsonl").write_text("")
    with StopRequested() as stop:
        while counters["epoch"] < cfg.epochs and counters["bad"] < cfg.patience and not stop.requested:
            epoch = counters["epoch"]
            train_loss = train_epoch(model, head, opt, sched, d, epoch, cfg, ctx)
            metrics = validate(model, head, d, cfg, device)
            improved = metrics["valid_f1_macro"] > counters["best_f1"]
            if improved:
                save_weights(out / "best", model, head)
            counters = {"epoch": epoch + 1, "best_f1": max(counters["best_f1"], metrics["valid_f1_macro"]),
                        "best_epoch": epoch + 1 if improved else counters["best_epoch"], "bad": 0 if improved else counters["bad"] + 1}  # fmt: skip
            _log_epoch(out, console, counters, train_loss, metrics, cfg.quiet)
            save_checkpoint(out, model, head, opt, sched, counters)
            stop.requested |= stop_after is not None and counters["epoch"] >= stop_after
    if stop.requested:
        console.print(f"stopped after epoch {counters['epoch']}; continue with --resume")
        return FinetuneResult(out, None, counters, d.notes)
    load_weights(out / "best", model, head)
    return FinetuneResult(out, write_bundle(out, cfg, encoder, model, head, d, device, counters, console), counters, d.notes)


def _log_epoch(out: Path, console: Console, counters: dict, train_loss: float, metrics: dict, quiet: bool) -> None:
    row = {"epoch": counters["epoch"], "train_loss": train_loss, **metrics}
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    if not quiet:
        console.print(f"epoch {row['epoch']}: train loss {train_loss:.4f}, valid loss {metrics['valid_loss']:.4f}, "
                      f"accuracy {metrics['valid_accuracy']:.4f}, macro-F1 {metrics['valid_f1_macro']:.4f}")  # fmt: skip


def write_bundle(out: Path, cfg: FinetuneConfig, encoder: Encoder, model: ESM, head: ProbeHead, d: Data,
                 device: torch.device, counters: dict, console: Console) -> Path:  # fmt: skip
    """Calibrate the best epoch's head on validation + negatives, then write the bundle with that one head."""
    negatives = shuffled(d.valid.sequences, cfg.seed) + d.outside
    valid_logits = logits_of(model, head, d.valid.sequences, cfg, device)
    calibration = calibrate(valid_logits, d.y_valid, logits_of(model, head, negatives, cfg, device), cfg.target_precision)
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
    save_bundle(bundle, model.cpu(), encoder.card.get("preset"), training, data.sequence_digests([tokens.encode(s) for s in d.train.sequences]))
    Head(head.cpu().eval(), d.labels, card).save(bundle / "heads" / cfg.task)
    dropped = [t for t in encoder.heads if t != cfg.task]
    if dropped:
        console.print(f"[yellow]note:[/] the parent's {', '.join(dropped)} head(s) were probed on the old encoder and do not fit "
                      f"the fine-tuned one; not copied (probe again: distill probe {bundle} --task ...)")  # fmt: skip
    console.print(f"calibration: temperature {calibration['temperature']:.3f}, ECE {calibration['ece_before']:.4f} -> "
                  f"{calibration['ece_after']:.4f}; no-call below p = {calibration['threshold']:.4f} for precision "
                  f">= {cfg.target_precision} (coverage {calibration['coverage']:.3f} of validation sequences)")  # fmt: skip
    if not calibration["reached"]:
        console.print(f"[yellow]warning:[/] no threshold reaches precision {cfg.target_precision} on validation + negatives, so every call "
                      "of this head is a no-call; add training data, train longer, or lower --target-precision")  # fmt: skip
    atomic_write_json(out / "metrics.json", {"valid": metrics, "calibration": calibration, **counters})
    return bundle
