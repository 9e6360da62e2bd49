"""Stop a server's process group when `distill serve` is gone, however it went (SIGKILL included).

    python -m serve.watchdog PGID GRACE_S      (stdin: a pipe whose other end only `distill serve` holds)

Reading stdin blocks until that pipe closes, which the kernel does when the `distill serve` process exits or is
killed; then the group gets SIGTERM, and SIGKILL after GRACE_S seconds. It imports nothing heavy.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def stop_group(pgid: int, grace_s: float) -> None:
    """SIGTERM to the whole group, then SIGKILL to whatever is left after ``grace_s``."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main() -> None:
    pgid, grace_s = int(sys.argv[1]), float(sys.argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for `distill serve`, which forwards it
    sys.stdin.buffer.read()
    stop_group(pgid, grace_s)


if __name__ == "__main__":
    main()
