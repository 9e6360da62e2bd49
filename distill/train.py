"""The distillation recipe: config in, loop visible.

    FitConfig -> data (split, keyed masking) -> student (+ frozen teacher) -> AdamW + warm-up/cosine
    -> for each epoch: for each optimizer step: token-budget micro-batches, accumulate, clip, step
    -> validate (fixed-seed perplexity) -> checkpoint -> student bundle (best by validation)

Run directory::

    RUN_DIR/config.json        resolved config (reusable with --config)
    RUN_DIR/metrics.jsonl      one row per optimizer step (+ one per validation)
    RUN_DIR/checkpoint.json    points at the latest complete checkpoint
    RUN_DIR/checkpoints/step-N/{model.safetensors,state.pt}   weights, optimizer, scheduler, counters
    RUN_DIR/student/           the student bundle (best validation perplexity)

Checkpoints are written completely before ``checkpoint.json`` is atomically switched to them, so a
kill at any moment leaves a checkpoint that ``--resume`` can trust. All randomness is keyed by
(seed, epoch, sequence), so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_model, save_model

from distill import data, teacher_cache
from distill.bundle import save_bundle
from distill.evaluate import autocast, perplexity
from distill.io import atomic_write_json, atomic_write_text, read_json_object
from distill.losses import distillation_loss, residue_logits
from distill.model import ESM, PRESETS, ModelConfig, build_student
from distill.pretrained import DEFAULT_TEACHER, load_pretrained

# Batch size (sequences per optimizer step) and epochs per preset, from the study.
PRESET_TRAINING = {"small": (512, 10), "medium": (128, 20), "large": (64, 30)}
# Options a resumed run may change; everything else must match the run being resumed.
RESUME_OVERRIDABLE = {"device", "max_steps", "save_every_minutes", "quiet"}


@dataclass
class FitConfig:
    data: str
    out: str
    valid: str | None = None
    valid_fraction: float = 0.05
    preset: str = "small"
    layers: int | None = None
    dim: int | None = None
    heads: int | None = None
    ffn: int | None = None
    teacher: str = DEFAULT_TEACHER
    teacher_cache: str | None = None  # read teacher logits from `distill teacher-cache` output instead
    mask_views: int | None = None  # K fixed maskings cycled over epochs (set by the cache); None = new masks each epoch
    temperature: float = 2.0
    lam: float = 0.5
    epochs: int | None = None  # preset default
    batch_size: int | None = None  # sequences per optimizer step; preset default
    max_tokens: int = 8192  # tokens (incl. padding) in one forward pass
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int | None = None  # default: 5% of all steps
    clip_norm: float = 1.0
    mask_rate: float = 0.15
    seed: int = 0
    device: str = "auto"
    save_every_minutes: float = 10.0
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps in this invocation
    quiet: bool = False

    def resolved(self) -> FitConfig:
        batch, epochs = PRESET_TRAINING.get(self.preset, (64, 10))
        cfg = FitConfig(**{f.name: getattr(self, f.name) for f in fields(self)})
        cfg.batch_size = cfg.batch_size or batch
        cfg.epochs = cfg.epochs or epochs
        cfg.betas = tuple(cfg.betas)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.preset not in PRESETS and self.preset != "custom":
            raise ValueError(f"--preset must be one of {', '.join(PRESETS)} or custom, got {self.preset!r}")
        if not 0 <= self.lam <= 1:
            raise ValueError(f"--lam must be in [0, 1], got {self.lam}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be positive, got {self.temperature}")
        if not 0 < self.mask_rate < 1:
            raise ValueError(f"--mask-rate must be in (0, 1), got {self.mask_rate}")
        if not 0 <= self.valid_fraction < 1:
            raise ValueError(f"--valid-fraction must be in [0, 1), got {self.valid_fraction}")
        for name in ("epochs", "batch_size", "max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")

    def model_config(self) -> ModelConfig:
        base = dict(PRESETS.get(self.preset, {}))
        custom = {k: getattr(self, k) for k in ("layers", "dim", "heads", "ffn") if getattr(self, k) is not None}
        merged = {**base, **custom}
        if "ffn" not in custom and "dim" in custom:
            merged["ffn"] = 2 * merged["dim"]  # the study's FFN = 2 x dim
        missing = {"layers", "dim", "heads"} - set(merged)
        if missing:
            raise ValueError(f"--preset custom needs --layers, --dim and --heads (missing {', '.join(sorted(missing))})")
        return ModelConfig(**merged)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FitConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(obj) - known
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
        return cls(**obj)


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(torch_dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (decisions such as early stopping must agree)."""
        if self.world == 1:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            torch_dist.all_reduce(t)
        return t.tolist()


def pick_device(name: str, dist: Distributed) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
        return torch.device("cuda", dist.local_rank)
    return torch.device(name)


def load_teacher(spec: str, device: torch.device) -> tuple[ESM, str]:
    """Frozen teacher (eval mode, no gradients, bf16 on CUDA) and the sha256 of its weights."""
    teacher = load_pretrained(spec).eval().requires_grad_(False)
    sha = teacher_cache.weights_sha256(teacher)
    return teacher.to(device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32), sha


def open_cache(cfg: FitConfig, n_records: int, data_sha256: str) -> teacher_cache.TeacherCache:
    """The run's teacher cache, checked against the run's data, masking, seed and teacher."""
    if cfg.lam == 0:
        raise ValueError("--teacher-cache is only used by distillation; --lam 0 trains without a teacher")
    cache = teacher_cache.TeacherCache(Path(cfg.teacher_cache))
    if cfg.teacher != DEFAULT_TEACHER and cfg.teacher != cache.key.teacher:
        raise teacher_cache.CacheMismatch(f"--teacher {cfg.teacher} differs from the cache's teacher {cache.key.teacher}")
    expected = teacher_cache.CacheKey(
        teacher=cache.key.teacher, teacher_sha256=cache.key.teacher_sha256, data_sha256=data_sha256,
        n_records=n_records, mask_rate=cfg.mask_rate, seed=cfg.seed, views=cfg.mask_views or cache.key.views,
    )  # fmt: skip
    cache.check(expected)
    return cache


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def make_optimizer(model: ESM, cfg: FitConfig) -> torch.optim.AdamW:
    # No weight decay on biases and layer norms (the usual BERT/RoBERTa choice).
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


class StopRequested:
    """Ctrl-C / SIGTERM set a flag checked between optimizer steps; a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequested:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _jsonl_truncate(path: Path, max_step: int) -> None:
    """Drop metric rows written after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= max_step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def save_checkpoint(out: Path, model: ESM, optimizer, scheduler, counters: dict[str, Any]) -> None:
    name = f"step-{counters['global_step']:08d}"
    final = out / "checkpoints" / name
    tmp = out / "checkpoints" / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "counters": counters}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    atomic_write_json(out / "checkpoint.json", {"path": f"checkpoints/{name}", **counters})
    for old in (out / "checkpoints").iterdir():
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, model: ESM, optimizer, scheduler) -> dict[str, Any]:
    pointer = out / "checkpoint.json"
    if not pointer.is_file():
        raise FileNotFoundError(f"{out} has no checkpoint.json: nothing to resume (was it a `distill fit` run directory?)")
    info = read_json_object(pointer)
    ckpt = out / info["path"]
    try:
        load_model(model, str(ckpt / "model.safetensors"), strict=True)
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except Exception as e:  # safetensors / pickle / shape errors all mean the same to the user
        raise ValueError(f"checkpoint {ckpt} is corrupt or does not match this run's student: {e}") from e
    return state["counters"]


@dataclass
class FitResult:
    out: Path
    completed: bool  # False when stopped by Ctrl-C/SIGTERM or --max-steps (resumable)


def _describe_teacher(cfg: FitConfig, teacher: ESM | None) -> str:
    if cfg.teacher_cache:
        return f"{cfg.teacher} from cache {cfg.teacher_cache} ({cfg.mask_views} views)"
    return f"{cfg.teacher} ({teacher.num_parameters() / 1e6:.1f}M)" if teacher else "none (lam=0, vanilla MLM)"


def fit(cfg: FitConfig, resume: bool = False) -> FitResult:
    cfg = cfg.resolved()
    dist = Distributed.from_env()
    device = pick_device(cfg.device, dist)
    out = Path(cfg.out)
    console = Console(stderr=True, soft_wrap=True, quiet=cfg.quiet or not dist.main)
    if not resume and (out / "checkpoint.json").exists():
        raise FileExistsError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")

    # ---- data -------------------------------------------------------------------------------
    train_set = data.load_fasta(Path(cfg.data))
    n_records, data_sha = len(train_set), data.dataset_fingerprint(Path(cfg.data))
    if cfg.valid:
        valid_set = data.load_fasta(Path(cfg.valid))
    elif cfg.valid_fraction > 0:
        train_set, valid_set = data.split(train_set, cfg.valid_fraction)
    else:
        valid_set = None
    if len(train_set) == 0:
        raise ValueError(f"no training sequences left in {cfg.data} after the validation split")
    train_digests = data.sequence_digests(train_set.seqs)
    lengths = train_set.lengths()
    data.token_budget_groups(lengths, np.array([int(lengths.argmax())]), cfg.max_tokens)  # fail early if too small
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * total_steps))

    # ---- models -----------------------------------------------------------------------------
    model_cfg = cfg.model_config()
    model = build_student(model_cfg, seed=cfg.seed).to(device)
    teacher = cache = None
    teacher_sha = None
    if cfg.teacher_cache:
        cache = open_cache(cfg, n_records, data_sha)
        cfg.teacher, cfg.mask_views, teacher_sha = cache.key.teacher, cache.key.views, cache.key.teacher_sha256
    elif cfg.lam > 0:
        teacher, teacher_sha = load_teacher(cfg.teacher, device)  # lam = 0: vanilla MLM, no teacher
    net = torch.nn.parallel.DistributedDataParallel(model) if dist.world > 1 else model
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total_steps))

    counters = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_val_ppl": None, "best_epoch": None}
    if resume:
        counters = load_checkpoint(out, model, optimizer, scheduler)
        if dist.main:
            _jsonl_truncate(out / "metrics.jsonl", counters["global_step"])
        console.print(f"resuming {out} at epoch {counters['epoch'] + 1}, step {counters['global_step']}/{total_steps}")
    elif dist.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", cfg.to_json())
    dist.barrier()

    summary = {
        "data": str(cfg.data),
        "data_sha256": data_sha,
        "n_train": len(train_set),
        "n_valid": len(valid_set) if valid_set else 0,
        "teacher": cfg.teacher if cfg.lam > 0 else None,
        "teacher_sha256": teacher_sha,
        "teacher_cache": cfg.teacher_cache,
        "lam": cfg.lam,
        "temperature": cfg.temperature,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
    }
    console.print(
        f"student {model_cfg.layers}x{model_cfg.dim} ({model.num_parameters() / 1e6:.2f}M params), "
        f"teacher {_describe_teacher(cfg, teacher)}, "
        f"{len(train_set)} train / {summary['n_valid']} valid sequences, {steps_per_epoch} steps/epoch x {cfg.epochs} epochs, "
        f"device {device}" + (f", {dist.world} processes" if dist.world > 1 else "")
    )

    def checkpoint() -> None:
        if dist.main:
            save_checkpoint(out, model, optimizer, scheduler, counters)
        dist.barrier()

    def write_bundle(val_ppl: float | None) -> None:
        training = {**summary, "steps": counters["global_step"], "epochs_done": counters["epoch"], "val_ppl": val_ppl}
        save_bundle(out / "student", model, cfg.preset, training, train_digests)

    metrics = open(out / "metrics.jsonl", "a") if dist.main else None
    progress = Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("loss {task.fields[loss]:.3f}  ppl {task.fields[ppl]:.2f}  {task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=console.quiet,
    )
    task = progress.add_task(
        "fit",
        total=total_steps,
        completed=counters["global_step"],
        epoch=counters["epoch"] + 1,
        loss=float("nan"),
        ppl=float("nan"),
        tps=0.0,
    )
    steps_this_run = 0
    last_save = time.monotonic()
    model.train()
    with StopRequested() as stop, progress:
        while counters["epoch"] < cfg.epochs:
            epoch = counters["epoch"]
            view = epoch % cfg.mask_views if cfg.mask_views else epoch  # which masking this epoch sees
            plan = data.plan_epoch(lengths, cfg.batch_size, cfg.seed, epoch)
            epoch_real = epoch_padded = 0
            while counters["step_in_epoch"] < len(plan):
                step_idx = plan[counters["step_in_epoch"]]
                t0 = time.perf_counter()
                # Every rank masks the whole step (cheap) so all know its number of targets.
                examples = {
                    int(i): data.masked_example(train_set.seqs[i], cfg.seed, view, int(train_set.keys[i]), cfg.mask_rate, train=True)
                    for i in step_idx
                }
                n_targets = sum(int((lab != data.IGNORE).sum()) for _, lab in examples.values())
                by_length = sorted(examples, key=lambda i: (lengths[i], i))
                mine = np.array(by_length[dist.rank :: dist.world], dtype=np.int64)
                weight = 1.0
                if len(mine) == 0:  # fewer sequences than ranks: join the all-reduce with zero weight
                    mine, weight = np.array(by_length[:1], dtype=np.int64), 0.0
                groups = data.token_budget_groups(lengths, mine, cfg.max_tokens)
                mlm = kd = 0.0
                real = padded = 0
                for j, group in enumerate(groups):
                    batch = data.collate([examples[i] for i in group], group)
                    toks, labels = batch.tokens.to(device), batch.labels.to(device)
                    sync = dist.world == 1 or j == len(groups) - 1
                    with nullcontext() if sync else net.no_sync():
                        sel = labels != data.IGNORE
                        with autocast(device):
                            s_logits = net(toks)["logits"][sel]
                            with torch.no_grad():
                                if cache is not None:
                                    t_logits = cache.logits(view, [int(train_set.keys[i]) for i in group]).to(device)
                                elif teacher is not None:
                                    t_logits = residue_logits(teacher(toks)["logits"][sel])
                                else:
                                    t_logits = None
                        parts = distillation_loss(s_logits, labels[sel], t_logits, cfg.lam, cfg.temperature, n_targets)
                        # DDP averages gradients over ranks; scale so the result is the global-batch mean.
                        (parts.total * dist.world * weight).backward()
                    mlm += parts.mlm.item() * weight
                    kd += parts.kd.item() * weight
                    real += batch.n_real if weight else 0
                    padded += batch.tokens.numel() if weight else 0
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm).item()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                mlm, kd, real, padded = dist.sum([mlm, kd, real, padded])
                counters["step_in_epoch"] += 1
                counters["global_step"] += 1
                steps_this_run += 1
                epoch_real += real
                epoch_padded += padded
                elapsed = time.perf_counter() - t0
                loss = (1 - cfg.lam) * mlm + cfg.lam * cfg.temperature**2 * kd
                row = {
                    "event": "train",
                    "step": counters["global_step"],
                    "epoch": epoch + 1,
                    "loss": loss,
                    "mlm": mlm,
                    "kd": kd,
                    "ppl": math.exp(min(mlm, 50)),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "seconds": elapsed,
                    "tokens": real,
                    "tokens_per_s": real / elapsed,
                    "padding": 1 - real / padded,
                    "seqs": len(step_idx),
                    "targets": n_targets,
                }
                if metrics:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                progress.update(
                    task, completed=counters["global_step"], epoch=epoch + 1, loss=loss, ppl=row["ppl"], tps=row["tokens_per_s"]
                )

                interrupt = stop.requested or (cfg.max_steps is not None and steps_this_run >= cfg.max_steps)
                if dist.world > 1:
                    interrupt = dist.sum([float(interrupt)])[0] > 0
                if interrupt or time.monotonic() - last_save > 60 * cfg.save_every_minutes:
                    checkpoint()
                    last_save = time.monotonic()
                if interrupt:
                    progress.stop()
                    why = "interrupted" if stop.requested else f"stopped after --max-steps {cfg.max_steps}"
                    if dist.main:  # always said, even with --quiet: the user must know how to continue
                        Console(stderr=True, soft_wrap=True).print(
                            f"{why}: checkpoint saved at step {counters['global_step']}; continue with: distill fit --resume {out}"
                        )
                    if metrics:
                        metrics.close()
                    return FitResult(out, completed=False)

            # ---- end of epoch: validate, keep the best, checkpoint ----------------------------
            counters["epoch"] += 1
            counters["step_in_epoch"] = 0
            val_ppl = None
            if valid_set is not None and dist.main:
                val_ppl, n_val = perplexity(model, valid_set, cfg.max_tokens, device, cfg.mask_rate)
                row = {"event": "valid", "step": counters["global_step"], "epoch": epoch + 1, "val_ppl": val_ppl, "val_targets": n_val}
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                if counters["best_val_ppl"] is None or val_ppl < counters["best_val_ppl"]:
                    counters["best_val_ppl"], counters["best_epoch"] = val_ppl, epoch + 1
                    write_bundle(val_ppl)
            console.print(
                f"epoch {epoch + 1}/{cfg.epochs}: padding {1 - epoch_real / max(1, epoch_padded):.1%}"
                + (
                    f", validation perplexity {val_ppl:.3f} (best {counters['best_val_ppl']:.3f}, epoch {counters['best_epoch']})"
                    if val_ppl
                    else ""
                )
            )
            checkpoint()
            last_save = time.monotonic()

    if dist.main:
        if valid_set is None:
            write_bundle(None)
        metrics.close()
        console.print(
            f"student bundle: {out / 'student'}"
            + (f" (best validation perplexity {counters['best_val_ppl']:.3f}, epoch {counters['best_epoch']})" if valid_set else "")
        )
    _check_replicas(model, dist, out)
    return FitResult(out, completed=True)


def _check_replicas(model: ESM, dist: Distributed, out: Path) -> None:
    """Under DDP, verify every rank ended with the same parameters and record it."""
    if dist.world == 1:
        return
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).cpu()
    gathered = [torch.zeros_like(checksum) for _ in range(dist.world)]
    torch_dist.all_gather(gathered, checksum)
    equal = all(torch.equal(g, gathered[0]) for g in gathered)
    if dist.main:
        atomic_write_json(out / "ddp_check.json", {"world_size": dist.world, "parameters_equal": equal})
    if not equal:
        raise RuntimeError("DDP replicas diverged: parameters differ between ranks")
