"""Exec output throughput guest -> host through the agent API (one booted sandbox, no CLI):
one exec writing SIZE MiB of stdout, then four at once.

    MATCHLOCK_HOME=/tmp/somewhere .venv/bin/python benchmarks/exec_output.py [SIZE_MIB] [RUNS]
"""

from __future__ import annotations

import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from matchlock.guest.client import Output
from matchlock.guest.protocol import ExecRequest, ExitStatus
from matchlock.image.resolve import resolve_image
from matchlock.sandbox.core import Sandbox, SandboxOptions

ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]


def _drain(sb: Sandbox, mib: int) -> float:
    t = time.perf_counter()
    ex = sb.exec(ExecRequest(argv=["head", "-c", str(mib << 20), "/dev/zero"], env=ENV))
    got, code = 0, -1
    for ev in ex.events():
        if isinstance(ev, Output):
            got += len(ev.data)
        elif isinstance(ev, ExitStatus):
            code = ev.code
    assert code == 0 and got == mib << 20, (code, got)
    return time.perf_counter() - t


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    resolved = resolve_image(None)
    with Sandbox(SandboxOptions(image=resolved.name, rootfs=resolved.rootfs)) as sb:
        sb.start()
        _drain(sb, 1)  # warm-up
        one = [mib / _drain(sb, mib) for _ in range(runs)]
        four = []
        for _ in range(runs):
            t = time.perf_counter()
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda _: _drain(sb, mib // 4), range(4)))
            four.append(mib / (time.perf_counter() - t))
    for name, xs in (("one exec", one), ("four execs at once (total)", four)):
        print(f"{name}: median {statistics.median(xs):.1f} MiB/s, "
              f"min {min(xs):.1f}, max {max(xs):.1f} (n={runs}, {mib} MiB each run)")


if __name__ == "__main__":
    main()
