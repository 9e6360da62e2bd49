"""The server's supervisor: it starts `bentoml serve` below itself, and however `distill serve` goes (SIGKILL
included), stops every process below it.

    python serve/supervisor.py GRACE_S TMPDIR CMD...   (stdin: a pipe whose other end only `distill serve` holds)

It makes itself a child subreaper (Linux), so a process whose parent dies below it (a worker after its arbiter, a
respawned worker, a double fork) is re-parented to it rather than to PID 1: "every process below the supervisor" is
then the whole server, however it forks, respawns or regroups. A snapshot taken from outside missed a worker that
BentoML's arbiter respawned while it was being stopped; it kept the port.

The server is stopped when the pipe on stdin closes (the kernel closes it when `distill serve` exits or dies), on
SIGTERM / SIGINT (forwarded by `distill serve`), or when it exits by itself: its process group gets the signal
(SIGTERM on a closed pipe) so BentoML stops its workers gracefully, and whatever is left below the supervisor
GRACE_S seconds later gets SIGKILL, again until nothing is left. Then TMPDIR (the server's argument file) is removed
and the supervisor exits with the server's status. It imports nothing beyond the standard library.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, whatever its process group or session: read from /proc, so it needs nothing
    imported. Zombies are left out (they hold nothing and are reaped by their parent)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def become_subreaper() -> bool:
    """Orphans below this process are re-parented to it (Linux 3.4+); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


class Supervisor:
    """The server process below this one, its exit status, and the signal that stops it."""

    def __init__(self, cmd: list[str], grace_s: float) -> None:
        self.grace_s = grace_s
        self.deadline: float | None = None  # set by the first stop request: SIGKILL for what is left after it
        self.status: int | None = None
        self.server = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Pass ``sig`` to the server's process group and start the grace period (once)."""
        if self.deadline is None:
            self.deadline = time.monotonic() + self.grace_s
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.server.pid, sig)

    def reap(self) -> None:
        """Collect every exited child (adopted orphans included), keeping the server's status."""
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.server.pid:
                self.status = self.server.returncode = os.waitstatus_to_exitcode(wait_status)

    def finish(self) -> None:
        """Wait for everything below to stop; after the grace period SIGKILL it, until nothing is left."""
        if self.status is None:
            if self.deadline is None:  # not asked by a signal: the pipe closed (a second SIGTERM could hurry BentoML)
                self.stop()
        else:  # the server is gone: nobody stops its workers gracefully, and nobody respawns them
            _signal(descendants(os.getpid()), signal.SIGTERM)
            self.deadline = self.deadline or time.monotonic() + self.grace_s
        while True:
            self.reap()
            below = descendants(os.getpid())
            if not below:
                if self.status is None:  # exited after the last reap: a zombie, left out of `below`
                    self.status = self.server.wait()
                return
            if time.monotonic() >= self.deadline:
                _signal(below, signal.SIGKILL)  # a process being killed cannot fork, so this reaches a fixed point
            time.sleep(0.05)


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _orphaned(timeout_s: float) -> bool:
    """Whether `distill serve` is gone: its end of the pipe on stdin closed (read gives EOF)."""
    ready, _, _ = select.select([sys.stdin.fileno()], [], [], timeout_s)
    return bool(ready) and not os.read(sys.stdin.fileno(), 4096)


def main() -> None:
    grace_s, tmp, cmd = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
    become_subreaper()
    supervisor = Supervisor(cmd, grace_s)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: supervisor.stop(signum))
    try:
        while supervisor.status is None and not _orphaned(0.1):
            if supervisor.deadline is not None and time.monotonic() >= supervisor.deadline:
                break
            supervisor.reap()
        supervisor.finish()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    status = supervisor.status if supervisor.status is not None else -signal.SIGKILL
    sys.exit(status if status >= 0 else 128 - status)


if __name__ == "__main__":
    main()
