"""Where a run executes: DDP ranks (torchrun), the device, and stop requests (Ctrl-C, SIGTERM) between steps."""

from __future__ import annotations

import atexit
import os
import signal
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

_FINAL_WORK: list[Any] = []  # see Distributed.close


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
            atexit.register(_destroy)  # a gloo group still alive at interpreter exit can abort the process
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

    def close(self) -> None:
        """Leave the group together (only on the normal path: after an error the peer may never arrive).

        Gloo's worker threads free finished work, and the Python tensors it holds, after ``wait()`` returns; the final
        barrier's work holds the works before it. Freed by a worker during interpreter shutdown, they cannot take the
        GIL and the rank aborts ("terminate called without an active exception"). Keeping that work referenced until
        exit leaves the last free to the main thread."""
        if self.world > 1 and torch_dist.is_initialized():
            work = torch_dist.barrier(async_op=True)
            work.wait()
            _FINAL_WORK.append(work)
            torch_dist.destroy_process_group()

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            torch_dist.all_reduce(t)
        return t.tolist()


def pick_device(name: str, dist: Distributed | None = None) -> torch.device:
    """auto: CUDA when torch sees it (this process's GPU under DDP), else CPU; cuda without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
        return torch.device("cuda", dist.local_rank if dist else 0)
    if name != "cpu":
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


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


def _destroy() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
