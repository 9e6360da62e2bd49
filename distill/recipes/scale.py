"""A job's chunks on more than one worker: this process, a Ray actor pool, or one scheduler shard of N.

``annotate``, ``teacher-cache`` and ``index`` cut their input into chunks the same way in every mode and hand each
chunk to a *worker*: a class whose ``__init__`` loads the model and whose ``run(chunk)`` returns the chunk's result.
``ordered_map`` runs it here (one worker) or on Ray (``ray.util.ActorPool``: one loaded model per actor, results in
submission order), so the caller writes results in input order and the output is the same bytes in both modes.

Why an actor pool fed by the driver, not Ray Data reading the file: the driver reads the FASTA with the same reader
as the single-process command (gzip, error rows, record numbering), which a block reader splitting the file by bytes
would have to reproduce; the driver only parses text, which is cheap next to a forward pass. Memory stays bounded:
at most ``2 x workers`` chunks are in flight. Actors restart when their process dies (``max_restarts=-1``) and the
lost call is retried (``max_task_retries=-1``): a dead worker costs its chunk, nothing else.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.core.errors import UserError

LOCAL = "local"  # --ray without an address: start a Ray instance on this machine for the run


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide: ``address`` None starts a local instance; ``auto`` or HOST:PORT joins a cluster."""

    address: str | None = None
    workers: int = 1
    threads: int = 1  # CPU threads per actor (ONNX Runtime / torch intra-op), also its Ray CPU reservation (0 counts as 1)
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        if self.workers < 1 or self.threads < 0 or self.gpus_per_worker < 0:
            raise ValueError(
                f"--workers must be at least 1, --threads and --gpus-per-worker at least 0, "
                f"got {self.workers}, {self.threads}, {self.gpus_per_worker}"
            )


def ray_options(address: str | None, workers: int, threads: int, gpus: float) -> RayOptions | None:
    """The CLI's ``--ray [ADDRESS]`` (``local`` when given without one) -> options, or None for one process."""
    if address is None:
        return None
    return RayOptions(None if address == LOCAL else address, workers, threads, gpus)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``I/N`` -> (I, N); the range of I is checked by ``shard_range``. None stays None."""
    if text is None:
        return None
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit() and int(n) >= 1):
        raise ValueError(f"--shard takes I/N with 0 <= I < N (for example 0/8), got {text!r}")
    return int(i), int(n)


def shard_range(total: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """Shard I of N handles the contiguous range [lo, hi) of ``total`` units: merging is then concatenation
    (streamed, no sort), and each shard keeps the locality of its input (chunks, lengths, cache files)."""
    if shard is None:
        return 0, total
    i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"--shard {i}/{n}: I must be in 0..{n - 1}")
    return i * total // n, (i + 1) * total // n


def order_parts(indexed: list[tuple[int, Path]], n: int, noun: str, whole: str) -> list[Path]:
    """The outputs of parts 0..n-1 of one job (given as (part index, path) in any order), in part order, after
    refusing a part given twice or missing; ``noun`` and ``whole`` name them in the message ("part", "parts of the cache")."""
    by_index: dict[int, Path] = {}
    for i, path in indexed:
        if i in by_index:
            raise ValueError(f"{noun} {i}/{n} is given twice ({by_index[i]} and {path})")
        by_index[i] = path
    if missing := [i for i in range(n) if i not in by_index]:
        raise ValueError(f"{noun}(s) {', '.join(f'{i}/{n}' for i in missing)} missing: give all {n} {whole}")
    return [by_index[i] for i in range(n)]


def ordered_map(worker: type, kwargs: dict[str, Any], chunks: Iterable[Any], ray: RayOptions | None) -> Iterator[Any]:
    """``worker(**kwargs).run(chunk)`` for every chunk, results in chunk order: here, or on a Ray actor pool."""
    if ray is None:
        w = worker(**kwargs)
        for chunk in chunks:
            yield w.run(chunk)
        return
    yield from _ray_map(worker, kwargs, chunks, ray)


def _ray_map(worker: type, kwargs: dict[str, Any], chunks: Iterable[Any], opts: RayOptions) -> Iterator[Any]:
    ray, started = connect(opts.address)
    from ray.util.actor_pool import ActorPool

    try:
        remote = ray.remote(num_cpus=max(opts.threads, 1), num_gpus=opts.gpus_per_worker, max_restarts=-1, max_task_retries=-1)(worker)
        pool = ActorPool([remote.remote(**(kwargs | {"threads": opts.threads})) for _ in range(opts.workers)])
        in_flight = 0
        for chunk in chunks:
            pool.submit(lambda actor, c: actor.run.remote(c), chunk)
            in_flight += 1
            if in_flight >= 2 * opts.workers:  # bounded: the driver never holds more than this many chunks
                yield _next(pool)
                in_flight -= 1
        while pool.has_next():
            yield _next(pool)
    finally:
        if started:
            ray.shutdown()


def _next(pool: Any) -> Any:
    import ray

    try:
        return pool.get_next()
    except ray.exceptions.RayTaskError as e:  # the worker's own exception (bad settings, a bug), not a lost process
        raise e.as_instanceof_cause() from None


def check_ray(opts: RayOptions | None) -> None:
    """Before a command writes anything: Ray is installed and a given head address answers."""
    if opts is None:
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'esm-distill[ray]' (on every machine of the cluster)") from None
    if opts.address and opts.address != "auto" and not opts.address.startswith("ray://"):
        _check_reachable(opts.address)


def connect(address: str | None) -> tuple[Any, bool]:
    """(``ray`` initialised, whether this call started it): a local instance or the cluster at
    ``address``; an instance this process already runs is used as it is. Clear errors otherwise."""
    check_ray(RayOptions(address))
    import ray

    if ray.is_initialized():
        return ray, False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:  # a private instance for this run (Ray's session token guards it), shut down at the end
        ray.init(include_dashboard=False, log_to_driver=False)
    return ray, True


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not after Ray's minute of retries, when nothing listens at HOST:PORT."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray takes HOST:PORT of a Ray head (as `ray start --head` prints), 'auto' or nothing; got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(
            f"--ray {address}: no Ray head answers there ({e}); start one with `ray start --head --port {port}` "
            "or give --ray without an address for a local instance"
        ) from None
