"""Checkpoints of ``distill finetune``: the last epoch (weights, optimizer, scheduler, counters) and the best one.

A checkpoint directory is written completely under a temporary name and then renamed, and ``checkpoint.json``
(the counters) is replaced atomically after it, so a kill at any moment leaves a state ``--resume`` can trust.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from distill.core.config import FinetuneConfig
from distill.core.heads import ProbeHead
from distill.core.io import atomic_write_json, read_json_object
from distill.core.model import ESM

RESUME_OVERRIDABLE = {"quiet", "device"}  # what a resumed run may change


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


def changed_options(out: Path, cfg: FinetuneConfig) -> list[str]:
    """The options of ``cfg`` that differ from the run saved in ``out`` (those a resumed run may change aside)."""
    saved, given = read_json_object(out / "config.json"), json.loads(json.dumps(asdict(cfg)))  # JSON round trip: lists, not tuples
    return sorted(k for k, v in given.items() if k not in RESUME_OVERRIDABLE and saved.get(k) != v)


def resume_state(out: Path, cfg: FinetuneConfig, model: ESM, head: ProbeHead, opt, sched) -> dict[str, Any]:
    if not (out / "checkpoint.json").is_file():
        raise FileNotFoundError(f"{out} has no checkpoint.json: nothing to resume (was it a `distill finetune` run directory?)")
    if changed := changed_options(out, cfg):
        raise ValueError(f"--resume: these options differ from the run in {out}: {', '.join(changed)}; resume with the same options")
    load_weights(out / "last", model, head)
    state = torch.load(out / "last" / "state.pt", map_location="cpu", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return read_json_object(out / "checkpoint.json")
