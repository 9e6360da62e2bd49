"""Checkpoints of every training recipe (``fit``, ``finetune``): written completely, then switched to atomically.

A checkpoint is a directory ``RUN/checkpoints/NAME/`` with one safetensors file per trained module (``model``;
finetune's ``head`` too) and ``state.pt`` (optimizer, scheduler, counters). It is written under a temporary name and
renamed, then ``RUN/checkpoint.json`` (the counters and the path) is replaced atomically to point at it, and the
older ones are removed: a kill at any moment leaves a state ``--resume`` can trust. ``save_weights`` /
``load_weights`` keep weights alone, the same way (finetune's best epoch). A resumed run must be the same run:
``changed_options`` names what differs from the saved ``config.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from distill.core.io import atomic_write_json, atomic_write_text, read_json_object


def save_weights(directory: Path, modules: dict[str, torch.nn.Module], extra: dict[str, Any] | None = None) -> None:
    """``NAME.safetensors`` per module (+ ``state.pt`` holding ``extra``), as one directory that appears whole."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, module in modules.items():
        save_model(module, str(tmp / f"{name}.safetensors"))  # shared (tied) tensors stored once
    if extra is not None:
        torch.save(extra, tmp / "state.pt")
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def load_weights(directory: Path, modules: dict[str, torch.nn.Module]) -> None:
    try:
        for name, module in modules.items():
            load_model(module, str(Path(directory) / f"{name}.safetensors"), strict=True)
    except Exception as e:  # safetensors, shape and key errors mean the same to the user
        raise ValueError(f"{directory} is corrupt or does not match this run's model: {e}") from e


def save_checkpoint(out: Path, name: str, modules: dict[str, torch.nn.Module], optimizer, scheduler, counters: dict[str, Any]) -> None:
    """Checkpoint ``name`` under ``out/checkpoints``, then the pointer to it; older checkpoints removed."""
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "counters": counters}
    save_weights(out / "checkpoints" / name, modules, state)
    atomic_write_json(out / "checkpoint.json", {"path": f"checkpoints/{name}", **counters})
    for old in (out / "checkpoints").iterdir():
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, modules: dict[str, torch.nn.Module], optimizer, scheduler, command: str) -> dict[str, Any]:
    """Weights, optimizer and scheduler from the checkpoint ``out/checkpoint.json`` points at; returns its counters."""
    pointer = out / "checkpoint.json"
    if not pointer.is_file():
        raise FileNotFoundError(f"{out} has no checkpoint.json: nothing to resume (was it a `distill {command}` run directory?)")
    ckpt = out / read_json_object(pointer)["path"]
    load_weights(ckpt, modules)
    try:
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except Exception as e:  # a truncated or foreign state file
        raise ValueError(f"checkpoint {ckpt} is corrupt or does not match this run: {e}") from e
    return state["counters"]


def changed_options(out: Path, given: dict[str, Any], overridable: set[str]) -> list[str]:
    """The options in ``given`` that differ from the run saved in ``out/config.json``, besides ``overridable``."""
    saved, given = read_json_object(out / "config.json"), json.loads(json.dumps(given))  # JSON round trip: lists, not tuples
    return sorted(k for k, v in given.items() if k not in overridable and saved.get(k) != v)


def jsonl_truncate(path: Path, key: str, last: int) -> None:
    """Drop metric rows written after the checkpoint a run resumes from (``row[key] > last``): they will be redone."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)[key] <= last]
    atomic_write_text(path, "".join(line + "\n" for line in keep))
