"""Stop a server's process group when `distill serve` is gone, however it went (SIGKILL included).

    python -m serve.watchdog PGID GRACE_S      (stdin: a pipe whose other end only `distill serve` holds)

Reading stdin blocks until that pipe closes, which the kernel does when the `distill serve` process exits or is
killed; then the group, and every process below its leader in whatever group, gets SIGTERM, and SIGKILL after
GRACE_S seconds. It imports nothing heavy.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, whatever its process group or session (a worker may set up its own): read from
    /proc, so it needs nothing imported."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_all(pgid: int, pids: list[int], sig: int) -> None:
    for kill, target in ((os.killpg, pgid), *((os.kill, p) for p in pids)):
        try:
            kill(target, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pgid: int, pids: list[int]) -> bool:
    for check, target in ((os.killpg, pgid), *((os.kill, p) for p in pids)):
        try:
            check(target, 0)
            return True
        except (ProcessLookupError, PermissionError):
            continue
    return False


def stop_group(pgid: int, grace_s: float) -> None:
    """SIGTERM to the whole group and to every process below its leader (workers that left the group included,
    taken before any of them is re-parented), then SIGKILL to whatever is left after ``grace_s``."""
    pids = descendants(pgid)
    _signal_all(pgid, pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _alive(pgid, pids):
        time.sleep(0.1)
    _signal_all(pgid, pids, signal.SIGKILL)


def main() -> None:
    pgid, grace_s = int(sys.argv[1]), float(sys.argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for `distill serve`, which forwards it
    sys.stdin.buffer.read()
    stop_group(pgid, grace_s)


if __name__ == "__main__":
    main()
