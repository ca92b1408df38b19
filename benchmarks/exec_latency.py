"""`matchlock exec` latency on a detached sandbox: a fresh CLI process per call, and the
round trip over the supervisor's socket from a process that is already running.

    MATCHLOCK_HOME=/tmp/somewhere .venv/bin/python benchmarks/exec_latency.py [N]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

MATCHLOCK = str(Path(sys.executable).with_name("matchlock"))


def _inprocess(sid: str) -> float:
    from matchlock.sandbox import wire
    from matchlock.sandbox.control import connect, frames

    t = time.perf_counter()
    s = connect(sid)
    s.sendall(wire.encode_json(wire.REQUEST, {"op": "exec", "argv": ["true"]}))
    for f in frames(s, wire.Decoder()):
        if f.type == wire.EXIT:
            assert f.json()["code"] == 0
            break
    s.close()
    return time.perf_counter() - t


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    sid = subprocess.run([MATCHLOCK, "run", "-d"], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        cli = []
        for _ in range(n):
            t = time.perf_counter()
            subprocess.run([MATCHLOCK, "exec", sid, "--", "true"], check=True)
            cli.append(time.perf_counter() - t)
        inproc = [_inprocess(sid) for _ in range(n)]
    finally:
        subprocess.run([MATCHLOCK, "rm", "-f", sid], check=True, capture_output=True)
    for name, xs in (("exec CLI (fresh process)", cli), ("in-process round trip", inproc)):
        xs.sort()
        print(f"{name}: p50 {statistics.median(xs) * 1e3:.1f} ms, "
              f"min {xs[0] * 1e3:.1f} ms, max {xs[-1] * 1e3:.1f} ms (n={n})")


if __name__ == "__main__":
    main()
