"""Every command's settings, in one torch-free module: the config dataclasses are the one source of defaults.

The CLI's options take their defaults from these classes (so ``--help`` shows what runs), the recipes read them,
and ``tests/test_config.py`` checks the README's tables against them.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from distill.core import tokens
from distill.core.io import read_json_object
from distill.core.labels import LabelRule, check_task_name

DEFAULT_TEACHER = "esm1b_t33_650M_UR50S"
TRAIN_MAX_TOKENS = 8192  # tokens (incl. padding) per forward pass when training
INFERENCE_MAX_TOKENS = 2 * TRAIN_MAX_TOKENS  # inference keeps no activations for a backward pass: twice training's budget
DEFAULT_TARGET_PRECISION = 0.99  # no-call thresholds are set for this precision on validation + negatives
DEFAULT_CONFIDENCE = 0.9  # ... as a one-sided Clopper-Pearson lower bound at this level (few calls cannot pass by luck)
NEGATIVE_RATE, NEGATIVE_WEIGHT = 0.25, 0.5  # outlier exposure: shuffled copies per step (share), their loss's weight
PROBE_NEGATIVES = 1000  # residue-shuffled training sequences a probe head trains (outlier exposure) and calibrates on
DEFAULT_MAX_EVALUE = 0.01  # an aligning index calls nothing weaker (HMMER's inclusion E-value): docs/calls.md
POOLINGS = ("mean", "cls")
SCAN_WINDOW, SCAN_STRIDE = 96, 32  # a proteome head's windows (distill.inference.scan; Pfam domains: median 84 residues)


@dataclass(frozen=True)
class ServeDefaults:
    """`distill serve`'s limits: serve.schemas.ServeArgs and the command line both read them here (torch- and
    pydantic-free, so `distill --help` stays light)."""

    max_sequences: int = 64  # per request
    max_residues: int = 65536  # per request
    max_request_bytes: int = 0  # 0: derived from the two limits above
    client_timeout: float = 10.0  # seconds for a request head, or a whole body
    max_concurrency: int = 8  # requests a worker takes on at once


SERVE = ServeDefaults()


@dataclass(frozen=True)
class AnnotateDefaults:
    """`distill annotate`'s defaults: the recipe's Options and the command line read them here."""

    top_k: int = 1  # labels per task and record
    long_policy: str = "windows"  # over 1,022 residues: overlapping windows, averaged (or crop)
    chunk_records: int = 1024  # the unit of length sorting, of resume and of Ray tasks
    reference_k: int = 3  # reference neighbours per record


ANNOTATE = AnnotateDefaults()

# Layers / dim / heads from the study; the FFN is 2 x dim, which is what gives its counts.
PRESETS: dict[str, dict[str, int]] = {
    "small": {"layers": 8, "dim": 128, "heads": 2, "ffn": 256},  # 1.2M parameters
    "medium": {"layers": 10, "dim": 256, "heads": 4, "ffn": 512},  # 5.6M
    "large": {"layers": 28, "dim": 384, "heads": 6, "ffn": 768},  # 33.7M
}


@dataclass(frozen=True)
class ModelConfig:
    layers: int
    dim: int
    heads: int
    ffn: int
    max_positions: int = 1024
    token_dropout: bool = True
    emb_layer_norm_before: bool = True
    position_embedding: str = "learned"  # "learned" (ESM-1b) or "rotary" (ESM-2)
    vocab_size: int = tokens.VOCAB_SIZE
    padding_idx: int = tokens.PAD
    mask_idx: int = tokens.MASK

    def __post_init__(self) -> None:
        if min(self.layers, self.dim, self.heads, self.ffn) < 1:
            raise ValueError(f"layers, dim, heads and ffn must be positive: {self}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.position_embedding not in ("learned", "rotary"):
            raise ValueError(f"position_embedding must be 'learned' or 'rotary', got {self.position_embedding!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


# Batch size (sequences per optimizer step) and epochs per preset, from the study.
PRESET_TRAINING = {"small": (512, 10), "medium": (128, 20), "large": (64, 30)}
# The measured way to distil a kind of teacher (its spec kind), used when no option of DISTILLATION is given: UniRep's
# causal logits lowered every probe, MSE to its pooled state at weight 70 beat MLM only (docs/results.md, UniRep-1900).
TEACHER_RECIPES = {"unirep": {"lam": 0.0, "rep_weight": 70.0, "rep_loss": "mse", "rep_level": "pooled"}}
DISTILLATION = ("lam", "rep_weight", "rep_loss", "rep_level")
KindOf = Callable[[str | None, str | None], str | None]  # (--teacher, --teacher-cache) -> the teacher's spec kind
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
    rep_weight: float = 0.0  # weight of representation distillation (student states -> teacher states); 0 = off
    rep_loss: str = "cosine"  # cosine | mse
    rep_level: str = "pooled"  # pooled | residue | both
    rep_centre: bool = False  # compare against the teacher's states less their running mean (the shared direction)
    epochs: int | None = None  # preset default
    batch_size: int | None = None  # sequences per optimizer step; preset default
    max_tokens: int = TRAIN_MAX_TOKENS  # tokens (incl. padding) in one forward pass
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
        checks = [
            (self.preset in PRESETS or self.preset == "custom", f"--preset must be one of {', '.join(PRESETS)} or custom, got {self.preset!r}"),
            (0 <= self.lam <= 1, f"--lam must be in [0, 1], got {self.lam}"),
            (self.temperature > 0, f"--temperature must be positive, got {self.temperature}"),
            (self.rep_weight >= 0 and self.rep_loss in ("cosine", "mse") and self.rep_level in ("pooled", "residue", "both"),
             f"--rep-weight must be >= 0 (got {self.rep_weight}), --rep-loss cosine or mse (got {self.rep_loss!r}), "
             f"--rep-level pooled, residue or both (got {self.rep_level!r})"),
            (not (self.rep_weight > 0 and self.teacher_cache and self.rep_level != "pooled"),
             "--rep-weight with --teacher-cache compares pooled embeddings only (--rep-level pooled): a cache stores no per-residue states"),
            (0 < self.mask_rate < 1, f"--mask-rate must be in (0, 1), got {self.mask_rate}"),
            (0 <= self.valid_fraction < 1, f"--valid-fraction must be in [0, 1), got {self.valid_fraction}"),
        ]  # fmt: skip
        checks += [(getattr(self, n) is None or getattr(self, n) >= 1, f"--{n.replace('_', '-')} must be at least 1")
                   for n in ("epochs", "batch_size", "max_tokens")]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def needs_teacher(self) -> bool:
        return self.lam > 0 or self.rep_weight > 0

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
        if unknown := set(obj) - {f.name for f in fields(cls)}:
            raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
        return cls(**obj)

    @classmethod
    def from_sources(cls, config_file: Path | None, given: dict[str, Any], teacher_kind: KindOf | None = None) -> FitConfig:
        """Defaults <- the teacher's recipe if no distillation option is given <- a JSON config file <- the command line."""
        merged = {**(read_json_object(config_file, "--config") if config_file else {}), **given}
        if teacher_kind and not set(DISTILLATION) & merged.keys():
            merged = {**TEACHER_RECIPES.get(teacher_kind(merged.get("teacher"), merged.get("teacher_cache")) or "", {}), **merged}
        for key, name in (("data", "DATA (the training FASTA)"), ("out", "--out RUN_DIR")):
            if key not in merged:
                raise ValueError(f"missing {name}")
        return cls.from_json(merged)

    @classmethod
    def for_resume(cls, run: Path, given: dict[str, Any]) -> FitConfig:
        """The run's saved config; only ``RESUME_OVERRIDABLE`` options may differ from it."""
        saved = read_json_object(Path(run) / "config.json", "run config")
        clash = sorted(k for k, v in given.items() if k not in RESUME_OVERRIDABLE and k != "out" and saved.get(k) != v)
        if "out" in given and Path(given["out"]).resolve() != Path(run).resolve():
            clash.append("out")
        if clash:
            raise ValueError(f"--resume continues {run} with its saved config; these options differ from it: {', '.join(clash)}")
        return cls.from_json({**saved, **{k: v for k, v in given.items() if k in RESUME_OVERRIDABLE}, "out": str(run)})


CLASS_WEIGHTS = ("auto", "none", "balanced")
MIN_FOR_BALANCED = 5  # auto: balanced only when every class has this many training examples
LP_FT_LR = 3e-4  # with --lp-ft: 1e-3 lost the probe's validation accuracy in its first epoch (docs/results.md)
HEAD_KINDS = ("cosine", "linear")


@dataclass
class FinetuneConfig:
    model: str  # bundle, random:PRESET[@SEED], fair-esm name or .pt
    data: list[str]
    task: str
    out: str
    valid: list[str] | None = None
    valid_fraction: float = 0.1  # per class, stratified; classes too small to spare one stay training-only
    labels: str | None = None  # id<TAB>label file for plain FASTA
    level: str = "superfamily"  # scope: class, fold, superfamily or family
    label_field: int = 1  # FASTA: the header field after the id that holds the label
    label_regex: str | None = None  # FASTA: or the first group of this regex
    epochs: int = 10
    lr: float | None = None  # None: LP_FT_LR with --lp-ft, else 1e-3 (the previous recipe's)
    weight_decay: float = 0.01
    clip_norm: float = 1.0  # gradient clipping max norm
    batch_size: int = 32  # sequences per optimizer step
    max_tokens: int = TRAIN_MAX_TOKENS  # tokens per forward pass (micro-batch), as in `distill fit`
    freeze_layers: int = 0  # embeddings + the first N layers stay fixed
    pooling: str = "mean"
    head: str = "cosine"
    class_weights: str = "auto"  # auto: balanced when every class has MIN_FOR_BALANCED training examples, else none
    min_per_class: int = 2  # classes with fewer training sequences leave the label set (they become negatives)
    patience: int = 3  # epochs without a better validation macro-F1 before stopping
    negative_rate: float = NEGATIVE_RATE  # residue-shuffled copies added per step, as a share of the step (0: none)
    negative_weight: float = NEGATIVE_WEIGHT  # weight of their loss towards the uniform distribution
    background: str | None = None  # a whole proteome of mostly non-members: negatives + per-label thresholds, a scanning head
    background_rate: float = 0.25  # background crops added per step as negatives, as a share of the step
    context_rate: float = 0.5  # with a background: share of training pieces cut or padded to a scan window (real flanks)
    teacher: str | None = None  # a fine-tuned bundle with a head for the same task
    lam: float = 0.5
    temperature: float = 2.0
    target_precision: float = DEFAULT_TARGET_PRECISION
    confidence: float = DEFAULT_CONFIDENCE  # the threshold's precision is a lower bound at this level (0: point)
    lp_ft: bool = False  # LP-FT: start from the probe's head (the probe is always the baseline a fine-tune must beat)
    folds: int | None = None  # k-fold calibration; None: auto (5 up to 2,000 labelled sequences), 0: the validation part
    seed: int = 0
    device: str = "auto"
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.lr is None:  # LP-FT starts from a trained head: a lower rate keeps what the probe found
            self.lr = LP_FT_LR if self.lp_ft else 1e-3

    def rule(self) -> LabelRule:
        return LabelRule(self.task, self.level, self.label_field, self.label_regex)

    def validate(self) -> None:
        self.rule()  # the task name, level and header rule
        checks = [
            (self.pooling in POOLINGS, f"--pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}"),
            (self.head in HEAD_KINDS, f"--head must be one of {', '.join(HEAD_KINDS)}, got {self.head!r}"),
            (self.class_weights in CLASS_WEIGHTS, f"--class-weights must be one of {', '.join(CLASS_WEIGHTS)}, got {self.class_weights!r}"),
            (0 < self.valid_fraction < 1 or self.valid, f"--valid-fraction must be in (0, 1), got {self.valid_fraction}"),
            (0 <= self.lam <= 1, f"--lam must be in [0, 1], got {self.lam}"),
            (self.temperature > 0, f"--temperature must be positive, got {self.temperature}"),
            (0 < self.target_precision <= 1, f"--target-precision must be in (0, 1], got {self.target_precision}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (0 <= self.confidence < 1, f"--confidence must be in [0, 1), got {self.confidence}"),
            (self.folds is None or self.folds == 0 or (self.folds >= 2 and not self.background),
             f"--folds must be 0 or at least 2, and 0 with --background (its held-out half calibrates), got {self.folds}"),
        ]  # fmt: skip
        checks += [(getattr(self, n) >= 1, f"--{n.replace('_', '-')} must be at least 1") for n in ("epochs", "batch_size", "patience")]
        checks += [(0 <= getattr(self, n) <= 1, f"--{n.replace('_', '-')} must be in [0, 1], got {getattr(self, n)}")
                   for n in ("negative_rate", "background_rate", "context_rate")]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class ProbeConfig:
    task: str
    data: list[str]
    test: list[str] | None = None
    split: str = "random"
    pooling: str = "mean"
    hidden: int = 0  # 0 = softmax regression; > 0 = one hidden layer (--mlp)
    min_per_class: int = 10
    test_fraction: float = 0.2
    seed: int = 0
    max_tokens: int = TRAIN_MAX_TOKENS
    device: str = "cpu"
    labels: str | None = None  # id<TAB>label file for plain-FASTA --data / --test
    valid: list[str] | None = None  # labelled files for early stopping (default: 10% of the training part)
    class_weights: str = "auto"  # auto | none | balanced (see choose_class_weights)
    level: str = "superfamily"  # scope: class, fold, superfamily or family
    label_field: int = 1  # FASTA: the header field after the id that holds the label
    label_regex: str | None = None  # FASTA: or the first group of this regex

    def rule(self) -> LabelRule:
        return LabelRule(self.task, self.level, self.label_field, self.label_regex)

    def protocol(self) -> dict[str, Any]:
        return {
            "probe": "frozen embeddings, standardised; "
            + (f"MLP, one hidden layer of {self.hidden}" if self.hidden else "linear softmax regression"),
            "loss": f"cross-entropy (class weights {self.class_weights}), AdamW, early stopping on "
            + ("the --valid files" if self.valid else "a 10% validation part of the training split"),
            "pooling": self.pooling,
            "split": self.split if self.test is None else "given test set",
            "test_fraction": self.test_fraction if self.test is None else None,
            **{key: getattr(self, key) for key in ("seed", "min_per_class", "data", "test")},
        }

    def describe(self, n_classes: int, n_train: int, n_test: int, weights: str = "balanced") -> str:
        held = {"family-holdout": ("families", "superfamilies"), "superfamily-holdout": ("superfamilies", "folds")}.get(self.split)
        split = (f"given test set {', '.join(self.test)}" if self.test else f"{self.split} split (test {held[0]} absent from training, "
                 f"{held[1]} seen)" if held else f"stratified random split {1 - self.test_fraction:.0%}/{self.test_fraction:.0%}")  # fmt: skip
        probe = f"MLP probe ({self.hidden} hidden)" if self.hidden else "linear probe (softmax regression)"
        return (f"Protocol: frozen-embedding {probe} on standardised {self.pooling}-pooled embeddings, cross-entropy with {weights} class weights, "
                f"early stopping on {'the --valid files' if self.valid else '10% of the training part'}; {split}, seed {self.seed}; labels with fewer "
                f"than {self.min_per_class} examples dropped. Task {self.task}: {n_classes} classes, {n_train} training and {n_test} test sequences. "
                "Precision, recall and F1 are given macro-averaged (every class counts the same) and weighted by class support.")  # fmt: skip


@dataclass
class SweepConfig:
    """`distill sweep CONFIG.toml` (format in ``distill.recipes.sweep.grid``'s docstring)."""

    out: str
    data: str
    teacher: str
    presets: list[str]
    tasks: dict[str, dict[str, Any]]  # task -> ProbeConfig settings (``data`` required)
    valid: str | None = None
    temperatures: list[float] = field(default_factory=lambda: [2.0])
    lambdas: list[float] = field(default_factory=lambda: [0.5])
    epochs: int | None = None  # None: each preset's
    teacher_cache: bool = False  # one cache (K = epochs views) shared by all runs
    baselines: bool = False
    fit: dict[str, Any] = field(default_factory=dict)  # any other FitConfig setting
    seed: int = 0  # of the subsets and the probe split (and of training when ``seeds`` is empty)
    data_sizes: list[int] = field(default_factory=list)  # nested random subsets of ``data``, besides all of it
    seeds: list[int] = field(default_factory=list)  # training seeds (paired: vanilla and distilled share each)
    finetune: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> FinetuneConfig settings + ``test`` (held out)

    def fit_config(self) -> FitConfig:
        """The ``[fit]`` settings over FitConfig's defaults (data and out filled per run)."""
        return FitConfig(data=self.data, out=self.out, **self.fit)

    @classmethod
    def from_toml(cls, path: Path) -> SweepConfig:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError as e:
            raise FileNotFoundError(f"sweep config {path} does not exist") from e
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path} is not valid TOML: {e}") from e
        known = {f.name for f in fields(cls)}
        if set(raw) - known:
            raise ValueError(f"{path}: unknown keys {sorted(set(raw) - known)}; allowed: {sorted(known)}")
        if missing := [key for key in ("out", "data", "teacher", "presets", "tasks") if key not in raw]:
            raise ValueError(f"{path}: missing required key {missing[0]!r}")
        if unknown := [name for name in raw["presets"] if name not in PRESETS]:
            raise ValueError(f"{path}: unknown preset {unknown[0]!r}; choose from {', '.join(PRESETS)}")
        task_keys = {f.name for f in fields(ProbeConfig)} - {"task", "device"}
        for task, settings in raw["tasks"].items():
            try:
                check_task_name(task)
            except ValueError as e:
                raise ValueError(f"{path}: [tasks.{task}]: {e}") from e
            bad = set(settings) - task_keys
            if bad or "data" not in settings:
                raise ValueError(f"{path}: [tasks.{task}] needs 'data' and takes {sorted(task_keys)}; got unknown {sorted(bad)}")
        if bad := set(raw.get("fit", {})) - {f.name for f in fields(FitConfig)}:
            raise ValueError(f"{path}: [fit] has unknown settings {sorted(bad)}")
        ft_keys = ({f.name for f in fields(FinetuneConfig)} - {"model", "task", "out", "seed", "quiet", "device"}) | {"test"}
        for task, settings in raw.get("finetune", {}).items():
            bad = set(settings) - ft_keys
            if bad or "data" not in settings or "test" not in settings:
                raise ValueError(
                    f"{path}: [finetune.{task}] needs 'data' and 'test' and takes {sorted(ft_keys)}; got unknown {sorted(bad)}"
                )
        return cls(**raw)
