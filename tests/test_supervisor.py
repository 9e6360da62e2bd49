"""The server's supervisor (serve/supervisor.py) against a fake server that does what BentoML's arbiter did in the
finding: it respawns a worker while it is being stopped, in a session of its own, and exits, orphaning it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve.supervisor import descendants

SUPERVISOR = Path(__file__).resolve().parents[1] / "serve" / "supervisor.py"

# A worker that ignores SIGTERM (as one busy with a request would, past any grace); an arbiter that starts one, and on
# SIGTERM starts another (a respawn) and exits at once. Each writes its pid to the log.
FAKE_SERVER = """
import os, signal, subprocess, sys, time
log = sys.argv[1]
worker = [sys.executable, "-c", "import os, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
          "open(sys.argv[1], 'a').write(f'{os.getpid()}\\\\n'); time.sleep(600)", log]
def respawn_and_leave(signum, frame):
    subprocess.Popen(worker, start_new_session=True)
    for _ in range(400):  # leave once the respawned worker runs (it writes its pid first)
        if len(open(log).read().split()) >= 3:
            break
        time.sleep(0.05)
    os._exit(int(sys.argv[2]))
signal.signal(signal.SIGTERM, respawn_and_leave)
subprocess.Popen(worker, start_new_session=True)
open(log, "a").write(f"{os.getpid()}\\n")
if sys.argv[2] == "3":
    time.sleep(0.5)
    respawn_and_leave(None, None)  # a server that exits by itself, leaving its workers
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _pids(log: Path, n: int, sup: subprocess.Popen) -> list[int]:
    for _ in range(600):  # polls, not a deadline: the fake server and its worker write their pids at start
        pids = [int(x) for x in log.read_text().split()] if log.exists() else []
        if len(pids) >= n or sup.poll() is not None:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"{log}: {pids}")


@pytest.mark.parametrize("how", ["pipe", "sigterm", "server-exits"])
def test_the_supervisor_leaves_no_process_behind_even_a_respawned_orphan(tmp_path, how):
    """Whether `distill serve` dies (its pipe closes), forwards SIGTERM, or the server exits by itself, every process
    the server ever started, a worker respawned during the stop and orphaned included, is gone after the grace period,
    the argument directory is removed, and the supervisor exits with the server's status."""
    log, args_dir = tmp_path / "pids", tmp_path / "args"
    args_dir.mkdir()
    status = {"pipe": 0, "sigterm": 0, "server-exits": 3}[how]
    sup = subprocess.Popen(
        [sys.executable, str(SUPERVISOR), "2.0", str(args_dir), sys.executable, "-c", FAKE_SERVER, str(log), str(status)],
        stdin=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    seen: list[int] = []
    try:
        seen = _pids(log, 2, sup)
        if how == "server-exits":
            seen = _pids(log, 3, sup)
        else:
            assert set(seen) <= set(descendants(sup.pid))
            if how == "pipe":
                sup.stdin.close()  # as when `distill serve` is SIGKILLed
            else:
                sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=60) == status
        seen = [int(x) for x in log.read_text().split()]
        # the server, its worker, the respawned worker (on a machine so loaded that the grace ran out before the
        # respawned worker wrote its pid, the supervisor killed it first: 2)
        assert len(seen) in (2, 3), seen
        assert not [p for p in seen if _alive(p)]
        assert not args_dir.exists()
    finally:
        for pid in [sup.pid, *seen]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ValueError, OSError):
            sup.stdin.close()
