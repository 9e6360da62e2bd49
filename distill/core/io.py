"""Atomic file writes: a killed process leaves the old file or the new one, never half of one."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_npy(path: Path, array: Any) -> None:
    """``np.save`` through a file handle: given a path, numpy would append ``.npy`` to the temporary name."""

    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch  # lazy: the ONNX inference path writes files through this module without torch

    atomic_write(path, lambda p: torch.save(obj, p))


def read_json_object(path: Path, what: str = "") -> dict[str, Any]:
    """A JSON object from ``path``; unreadable, malformed or non-object files raise a message naming it."""
    label = f"{what} {path}".strip()
    try:
        obj = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{label} is not valid JSON: {e}") from e
    except OSError as e:
        raise FileNotFoundError(f"{label} cannot be read: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{label} must hold a JSON object")
    return obj


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
