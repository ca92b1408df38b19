"""`matchlock exec` latency on a detached sandbox: a fresh CLI process per call, the round
trip over the supervisor's socket from a process that is already running, and the guest's
own exec through the sandbox core in this process (no socket, no supervisor); then `run -d`
until the id is printed against `run -- true`, interleaved.

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


def _core(n: int) -> list[float]:
    """`Sandbox.exec` of `true` on a sandbox this process owns: the floor under both."""
    from matchlock.guest.protocol import ExecRequest
    from matchlock.image.resolve import resolve_image
    from matchlock.sandbox import boot
    from matchlock.sandbox.core import Sandbox, SandboxOptions

    img = resolve_image(None)
    boot.artifacts()
    out = []
    with Sandbox(SandboxOptions(image=img.name, rootfs=img.rootfs)) as sb:
        sb.start()
        for _ in range(n + 3):
            t = time.perf_counter()
            ex = sb.exec(ExecRequest(argv=["true"], env=["PATH=/bin:/usr/bin"], cwd="/"))
            for _ev in ex.events():
                pass
            out.append(time.perf_counter() - t)
    return out[3:]


def _starts(n: int) -> tuple[list[float], list[float]]:
    detached, oneshot = [], []
    for _ in range(n):
        t = time.perf_counter()
        sid = subprocess.run([MATCHLOCK, "run", "-d"], check=True, capture_output=True,
                             text=True).stdout.strip()
        detached.append(time.perf_counter() - t)
        subprocess.run([MATCHLOCK, "rm", "-f", sid], check=True, capture_output=True)
        t = time.perf_counter()
        subprocess.run([MATCHLOCK, "run", "--", "true"], check=True, capture_output=True)
        oneshot.append(time.perf_counter() - t)
    return detached, oneshot


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
    core = _core(n)
    detached, oneshot = _starts(max(5, n // 2))
    for name, xs in (("exec CLI (fresh process)", cli), ("in-process round trip", inproc),
                     ("Sandbox.exec in process (no socket)", core),
                     ("run -d until the id is printed", detached),
                     ("run -- true (same run, interleaved)", oneshot)):
        xs.sort()
        print(f"{name}: p50 {statistics.median(xs) * 1e3:.1f} ms, "
              f"min {xs[0] * 1e3:.1f} ms, max {xs[-1] * 1e3:.1f} ms (n={len(xs)})")


if __name__ == "__main__":
    main()
