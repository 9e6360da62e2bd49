"""`distill fit` checkpoints: written completely, then ``checkpoint.json`` is switched to them atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from distill.core.io import atomic_write_json, atomic_write_text, read_json_object
from distill.core.model import ESM


def jsonl_truncate(path: Path, max_step: int) -> None:
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
