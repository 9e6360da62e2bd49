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
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from distill.core import data, tokens
from distill.core.bundle import save_bundle
from distill.core.config import DEFAULT_TEACHER, FitConfig
from distill.core.distributed import Distributed, StopRequested, pick_device
from distill.core.io import atomic_write_json, read_json_object
from distill.core.losses import LossParts, Projected, distillation_loss, mix, representation_loss
from distill.core.model import ESM, build_student
from distill.core.spec import parse_spec
from distill.recipes import teacher_cache
from distill.recipes.checkpoints import jsonl_truncate, load_checkpoint, save_checkpoint
from distill.recipes.outline import adamw, optimizer_step, warmup_cosine
from distill.recipes.perplexity import autocast, perplexity
from distill.recipes.teacher_cache import load_teacher, teacher_outputs


def open_cache(cfg: FitConfig, n_records: int, data_sha256: str) -> teacher_cache.TeacherCache:
    """The run's teacher cache, checked against the run's data, masking, seed and teacher."""
    if not cfg.needs_teacher:
        raise ValueError("--teacher-cache is only used by distillation; --lam 0 trains without a teacher")
    cache = teacher_cache.TeacherCache(Path(cfg.teacher_cache))
    if cfg.teacher != DEFAULT_TEACHER and cfg.teacher != cache.key.teacher:
        raise teacher_cache.CacheMismatch(f"--teacher {cfg.teacher} differs from the cache's teacher {cache.key.teacher}")
    # With lam 0 only the pooled embeddings are read, and they do not depend on the masking: any seed's cache serves.
    masking = (cfg.mask_rate, cfg.seed) if cfg.lam > 0 else (cache.key.mask_rate, cache.key.seed)
    expected = teacher_cache.CacheKey(
        teacher=cache.key.teacher, teacher_sha256=cache.key.teacher_sha256, data_sha256=data_sha256, n_records=n_records,
        mask_rate=masking[0], seed=masking[1], views=cfg.mask_views or cache.key.views, causal=cache.key.causal,
    )  # fmt: skip
    cache.check(expected)
    return cache


def teacher_kind(teacher: str | None, cache: str | None) -> str | None:
    """The spec kind of the teacher a run will learn from (``--teacher``, else the cache's), for its recipe defaults;
    None when neither names one (errors about them are the recipe's to raise, with their context)."""
    try:
        spec = teacher or (teacher_cache.TeacherCache(Path(cache)).key.teacher if cache else None)
        return parse_spec(spec).kind if spec else None
    except (OSError, ValueError):
        return None


def fit_finished(run: Path) -> bool:
    """Whether the run directory holds a run that trained all its epochs (its bundle written): nothing to resume."""
    if not (run / "checkpoint.json").is_file() or not (run / "student" / "config.json").is_file():
        return False
    return read_json_object(run / "checkpoint.json").get("epoch", 0) >= (read_json_object(run / "config.json").get("epochs") or 0)


@dataclass
class FitResult:
    out: Path
    completed: bool  # False when stopped by Ctrl-C/SIGTERM or --max-steps (resumable)


class FitRecipe:
    """``distill fit`` as steps: setup (data, models, optimiser, resume) -> train epochs -> validate -> checkpoint -> bundle.

    ``run`` is the whole loop on one screen; each step below it is a method of its own.
    """

    def __init__(self, cfg: FitConfig, resume: bool = False):
        self.cfg, self.resume = cfg.resolved(), resume
        self.dist = Distributed.from_env()
        self.device = pick_device(self.cfg.device, self.dist)
        self.out = Path(self.cfg.out)
        self.console = Console(stderr=True, soft_wrap=True, quiet=self.cfg.quiet or not self.dist.main)
        if not resume and (self.out / "checkpoint.json").exists():
            raise FileExistsError(f"{self.out} already holds a run; continue it with --resume {self.out} or choose another --out")
        self.setup_data()
        self.setup_models()
        self.setup_optimizer()
        self.load_or_start()

    # ---- setup -------------------------------------------------------------------------------

    def setup_data(self) -> None:
        cfg = self.cfg
        self.train_set = data.load_fasta(Path(cfg.data))
        self.n_records, self.data_sha = len(self.train_set), data.dataset_fingerprint(Path(cfg.data))
        self.valid_set = None
        if cfg.valid:
            self.valid_set = data.load_fasta(Path(cfg.valid))
        elif cfg.valid_fraction > 0:
            self.train_set, self.valid_set = data.split(self.train_set, cfg.valid_fraction)
        if len(self.train_set) == 0:
            raise ValueError(f"no training sequences left in {cfg.data} after the validation split")
        self.lengths = self.train_set.lengths()
        tokens.token_budget_groups(self.lengths, np.array([int(self.lengths.argmax())]), cfg.max_tokens)  # fail early if too small
        self.steps_per_epoch = math.ceil(len(self.train_set) / cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs

    def setup_models(self) -> None:
        """The student (seeded), and the teacher: live, from a cache of its logits, or none (lam = 0: vanilla MLM)."""
        cfg = self.cfg
        self.model = build_student(cfg.model_config(), seed=cfg.seed).to(self.device)
        self.teacher = self.cache = self.teacher_sha = None
        if cfg.teacher_cache:
            self.cache = open_cache(cfg, self.n_records, self.data_sha)
            cfg.teacher, cfg.mask_views, self.teacher_sha = self.cache.key.teacher, self.cache.key.views, self.cache.key.teacher_sha256
        elif cfg.needs_teacher:
            self.teacher, self.teacher_sha = load_teacher(cfg.teacher, self.device)
        # With representation distillation the student trains beside a map to the teacher's width (not in its bundle).
        if cfg.rep_weight > 0:
            teacher_dim = self.cache.pooled([int(self.train_set.keys[0])]).shape[1] if self.cache else self.teacher.cfg.dim
            self.trained = Projected(self.model, teacher_dim, cfg.rep_level, cfg.rep_centre).to(self.device)
        else:
            self.trained = self.model
        self.net = torch.nn.parallel.DistributedDataParallel(self.trained) if self.dist.world > 1 else self.trained

    def setup_optimizer(self) -> None:
        cfg = self.cfg
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * self.total_steps))
        self.optimizer = adamw(self.trained.parameters(), cfg.lr, cfg.weight_decay, cfg.betas)
        self.scheduler = warmup_cosine(self.optimizer, warmup, self.total_steps)

    def load_or_start(self) -> None:
        """Counters (and weights, optimiser, schedule) from the last checkpoint, or a fresh run directory."""
        self.counters = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_val_ppl": None, "best_epoch": None}
        if self.resume:
            self.counters = load_checkpoint(self.out, {"model": self.trained}, self.optimizer, self.scheduler, "fit")
            if self.dist.main:
                jsonl_truncate(self.out / "metrics.jsonl", "step", self.counters["global_step"])
            self.console.print(
                f"resuming {self.out} at epoch {self.counters['epoch'] + 1}, step {self.counters['global_step']}/{self.total_steps}"
            )
        elif self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out / "config.json", self.cfg.to_json())
        self.dist.barrier()
        cfg = self.cfg
        self.summary = {
            "data": str(cfg.data), "data_sha256": self.data_sha, "n_train": len(self.train_set),
            "n_valid": len(self.valid_set) if self.valid_set else 0, "teacher": cfg.teacher if cfg.needs_teacher else None,
            "teacher_sha256": self.teacher_sha, "teacher_cache": cfg.teacher_cache, "lam": cfg.lam, "temperature": cfg.temperature,
            "rep_weight": cfg.rep_weight, "rep_loss": cfg.rep_loss, "rep_level": cfg.rep_level, "rep_centre": cfg.rep_centre,
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "seed": cfg.seed,
        }  # fmt: skip

    # ---- the loop ----------------------------------------------------------------------------

    def run(self) -> FitResult:
        cfg, counters = self.cfg, self.counters
        self.console.print(self.describe())
        self.metrics = open(self.out / "metrics.jsonl", "a") if self.dist.main else None
        self.progress = progress_bar(self.console)
        self.task = self.progress.add_task("fit", total=self.total_steps, completed=counters["global_step"], epoch=counters["epoch"] + 1,
                                           loss=float("nan"), ppl=float("nan"), tps=0.0)  # fmt: skip
        self.steps_this_run, self.last_save = 0, time.monotonic()
        self.model.train()
        with StopRequested() as stop, self.progress:
            while counters["epoch"] < cfg.epochs:
                if not self.train_epoch(stop):
                    return self.stopped(stop)
                counters["epoch"] += 1
                counters["step_in_epoch"] = 0
                self.end_epoch(self.validate())
        self.finish()
        return FitResult(self.out, completed=True)

    def train_epoch(self, stop: StopRequested) -> bool:
        """The epoch's remaining optimizer steps; False when asked to stop (a checkpoint is written first)."""
        cfg, counters = self.cfg, self.counters
        epoch = counters["epoch"]
        view = epoch % cfg.mask_views if cfg.mask_views else epoch  # which masking this epoch sees
        plan = data.plan_epoch(self.lengths, cfg.batch_size, cfg.seed, epoch)
        self.epoch_real = self.epoch_padded = 0
        while counters["step_in_epoch"] < len(plan):
            row = self.train_step(plan[counters["step_in_epoch"]], view)
            counters["step_in_epoch"] += 1
            counters["global_step"] += 1
            self.steps_this_run += 1
            self.log(row)
            interrupt = stop.requested or (cfg.max_steps is not None and self.steps_this_run >= cfg.max_steps)
            if self.dist.world > 1:
                interrupt = self.dist.sum([float(interrupt)])[0] > 0
            if interrupt or time.monotonic() - self.last_save > 60 * cfg.save_every_minutes:
                self.checkpoint()
            if interrupt:
                return False
        return True

    def train_step(self, step_idx: np.ndarray, view: int) -> dict:
        """One optimizer step: this rank's token-budget micro-batches, gradients accumulated, clipped, stepped."""
        cfg, dist, t0 = self.cfg, self.dist, time.perf_counter()
        # Every rank masks the whole step (cheap) so all know its number of targets.
        keys = self.train_set.keys
        examples = {
            int(i): data.masked_example(self.train_set.seqs[i], cfg.seed, view, int(keys[i]), cfg.mask_rate, train=True) for i in step_idx
        }
        n_targets = sum(int((lab != data.IGNORE).sum()) for _, lab in examples.values())
        by_length = sorted(examples, key=lambda i: (self.lengths[i], i))
        mine, weight = np.array(by_length[dist.rank :: dist.world], dtype=np.int64), 1.0
        if len(mine) == 0:  # fewer sequences than ranks: join the all-reduce with zero weight
            mine, weight = np.array(by_length[:1], dtype=np.int64), 0.0
        groups = tokens.token_budget_groups(self.lengths, mine, cfg.max_tokens)
        mlm = kd = rep = 0.0
        counts = (len(step_idx), int(sum(min(int(self.lengths[i]), tokens.MAX_RESIDUES) for i in step_idx)))  # rows of the rep term
        real = padded = 0
        for j, group in enumerate(groups):
            batch = data.collate([examples[i] for i in group], group)
            sync = dist.world == 1 or j == len(groups) - 1
            with nullcontext() if sync else self.net.no_sync():
                parts = self.loss(batch, view, n_targets, counts)
                # DDP averages gradients over ranks; scale so the result is the global-batch mean.
                (parts.total * dist.world * weight).backward()
            mlm, kd, rep = mlm + parts.mlm.item() * weight, kd + parts.kd.item() * weight, rep + parts.rep.item() * weight
            real += batch.n_real if weight else 0
            padded += batch.tokens.numel() if weight else 0
        grad_norm = optimizer_step(self.trained.parameters(), self.optimizer, self.scheduler, cfg.clip_norm)
        mlm, kd, rep, real, padded = dist.sum([mlm, kd, rep, real, padded])
        self.epoch_real, self.epoch_padded = self.epoch_real + real, self.epoch_padded + padded
        elapsed = time.perf_counter() - t0
        return {"event": "train", "step": self.counters["global_step"] + 1, "epoch": self.counters["epoch"] + 1,
                "loss": mix(mlm, kd, cfg.lam, cfg.temperature) + cfg.rep_weight * rep, "mlm": mlm, "kd": kd, "rep": rep, "ppl": math.exp(min(mlm, 50)),
                "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm, "seconds": elapsed, "tokens": real,
                "tokens_per_s": real / elapsed, "padding": 1 - real / padded, "seqs": len(step_idx), "targets": n_targets}  # fmt: skip

    def loss(self, batch: data.Batch, view: int, n_targets: int, counts: tuple[int, int]) -> LossParts:
        """(1 - lam) MLM + lam T^2 KL over the batch's masked positions (the teacher live or from the cache), plus
        rep_weight x the representation term over the step's sequences or residues (``counts``)."""
        cfg = self.cfg
        toks, labels = batch.tokens.to(self.device), batch.labels.to(self.device)
        sel = labels != data.IGNORE
        with autocast(self.device):
            out = self.net(toks)
            with torch.no_grad():
                if self.cache is not None:
                    keys = [int(self.train_set.keys[i]) for i in batch.index]
                    teacher = {"logits": self.cache.logits(view, keys).to(self.device) if cfg.lam > 0 else None}
                    if cfg.rep_weight > 0:  # a causal teacher's cache holds its pooled embeddings
                        teacher["pooled"] = self.cache.pooled(keys).to(self.device)
                elif self.teacher is not None:
                    teacher = teacher_outputs(self.teacher, toks, labels)
                    teacher["logits"] = teacher["logits"][sel]
                else:
                    teacher = {"logits": None}
        parts = distillation_loss(out["logits"][sel], labels[sel], teacher["logits"], cfg.lam, cfg.temperature, n_targets)
        if cfg.rep_weight > 0:
            residues = toks.ne(tokens.PAD) & toks.ne(tokens.CLS) & toks.ne(tokens.EOS)
            teacher = self.trained.centred(teacher, residues)
            parts.rep = representation_loss(out, teacher, residues, cfg.rep_loss, cfg.rep_level, *counts)
            parts.total = parts.total + cfg.rep_weight * parts.rep
        return parts

    # ---- validate, checkpoint, bundle ----------------------------------------------------------

    def validate(self) -> float | None:
        """Fixed-seed validation perplexity (rank 0); a new best writes the bundle."""
        if self.valid_set is None or not self.dist.main:
            return None
        c = self.counters
        val_ppl, n_val = perplexity(self.model, self.valid_set, self.cfg.max_tokens, self.device, self.cfg.mask_rate)
        self.write_row({"event": "valid", "step": c["global_step"], "epoch": c["epoch"], "val_ppl": val_ppl, "val_targets": n_val})
        if c["best_val_ppl"] is None or val_ppl < c["best_val_ppl"]:
            c["best_val_ppl"], c["best_epoch"] = val_ppl, c["epoch"]
            self.write_bundle(val_ppl)
        return val_ppl

    def end_epoch(self, val_ppl: float | None) -> None:
        c = self.counters
        best = f", validation perplexity {val_ppl:.3f} (best {c['best_val_ppl']:.3f}, epoch {c['best_epoch']})" if val_ppl else ""
        self.console.print(f"epoch {c['epoch']}/{self.cfg.epochs}: padding {1 - self.epoch_real / max(1, self.epoch_padded):.1%}{best}")
        self.checkpoint()

    def checkpoint(self) -> None:
        if self.dist.main:
            name = f"step-{self.counters['global_step']:08d}"
            save_checkpoint(self.out, name, {"model": self.trained}, self.optimizer, self.scheduler, self.counters)
        self.dist.barrier()
        self.last_save = time.monotonic()

    def write_bundle(self, val_ppl: float | None) -> None:
        c = self.counters
        training = {**self.summary, "steps": c["global_step"], "epochs_done": c["epoch"], "val_ppl": val_ppl}
        save_bundle(self.out / "student", self.model, self.cfg.preset, training, data.sequence_digests(self.train_set.seqs))

    def finish(self) -> None:
        if self.dist.main:
            if self.valid_set is None:
                self.write_bundle(None)
            self.metrics.close()
            c = self.counters
            best = f" (best validation perplexity {c['best_val_ppl']:.3f}, epoch {c['best_epoch']})" if self.valid_set else ""
            self.console.print(f"student bundle: {self.out / 'student'}{best}")
        _check_replicas(self.model, self.dist, self.out)

    def stopped(self, stop: StopRequested) -> FitResult:
        self.progress.stop()
        why = "interrupted" if stop.requested else f"stopped after --max-steps {self.cfg.max_steps}"
        if self.dist.main:  # always said, even with --quiet: the user must know how to continue
            Console(stderr=True, soft_wrap=True).print(
                f"{why}: checkpoint saved at step {self.counters['global_step']}; continue with: distill fit --resume {self.out}"
            )
        if self.metrics:
            self.metrics.close()
        return FitResult(self.out, completed=False)

    # ---- reporting -----------------------------------------------------------------------------

    def describe(self) -> str:
        cfg, m = self.cfg, self.model.cfg
        if cfg.teacher_cache:
            teacher = f"{cfg.teacher} from cache {cfg.teacher_cache} ({cfg.mask_views} views)"
        else:
            teacher = f"{cfg.teacher} ({self.teacher.num_parameters() / 1e6:.1f}M)" if self.teacher else "none (lam=0, vanilla MLM)"
        teacher += f", logit KD lam {cfg.lam:g}, T {cfg.temperature:g}" if cfg.lam > 0 else ""
        if cfg.rep_weight > 0:
            centred = ", centred" if cfg.rep_centre else ""
            teacher += f", representation distillation ({cfg.rep_loss}{centred}, {cfg.rep_level} states, weight {cfg.rep_weight})"
        return (f"student {m.layers}x{m.dim} ({self.model.num_parameters() / 1e6:.2f}M params), teacher {teacher}, "
                f"{len(self.train_set)} train / {self.summary['n_valid']} valid sequences, {self.steps_per_epoch} steps/epoch x "
                f"{cfg.epochs} epochs, device {self.device}" + (f", {self.dist.world} processes" if self.dist.world > 1 else ""))  # fmt: skip

    def write_row(self, row: dict) -> None:
        if self.metrics:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()

    def log(self, row: dict) -> None:
        self.write_row(row)
        self.progress.update(self.task, completed=self.counters["global_step"], epoch=row["epoch"], loss=row["loss"], ppl=row["ppl"],
                             tps=row["tokens_per_s"])  # fmt: skip


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("loss {task.fields[loss]:.3f}  ppl {task.fields[ppl]:.2f}  {task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=console.quiet,
    )  # fmt: skip


def fit(cfg: FitConfig, resume: bool = False) -> FitResult:
    """Train a student (see ``FitRecipe``); resumable to the same weights."""
    recipe = FitRecipe(cfg, resume)
    result = recipe.run()
    recipe.dist.close()
    return result


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
