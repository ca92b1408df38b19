#!/usr/bin/env python3
"""Throughput of a published port (`run -p`, relayed over the agent's control channel).

    MATCHLOCK_HOME=/tmp/somewhere .venv/bin/python benchmarks/ports_throughput.py [MiB] [runs]

One `--no-network` sandbox of the default (busybox) image runs a loop of `nc -l -e` servers on
the guest's loopback; the host connects through the published port and moves MiB bytes each
way, `runs` times, timing from connect to the end of the transfer. Also, for scale: the same
amount as the command's stdout (the exec channel). Every figure says which accelerator ran.
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

MATCHLOCK = str(Path(sys.executable).with_name("matchlock"))
PORT = 18480


def _until_data(fn: object) -> float:
    """Retry while the host listener or the guest's nc is not up yet."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            t = fn()  # type: ignore[operator]
        except OSError:  # the listener is not up yet, or nc was not listening
            t = None
        if t is not None:
            return float(t)
        time.sleep(0.2)
    raise SystemExit("the guest server never answered")


def _download(nbytes: int) -> float | None:
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", PORT), timeout=120) as s:
        got = 0
        while d := s.recv(1 << 18):
            got += len(d)
    if got == 0:
        return None
    assert got == nbytes, got
    return time.perf_counter() - t


def _upload(nbytes: int) -> float | None:
    t = time.perf_counter()
    chunk = b"\0" * (1 << 16)
    with socket.create_connection(("127.0.0.1", PORT), timeout=120) as s:
        sent = 0
        while sent < nbytes:
            sent += s.send(chunk[: nbytes - sent])
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while d := s.recv(100):
            answer += d
    if answer.strip() != str(nbytes).encode():
        return None
    return time.perf_counter() - t


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    n = mib << 20
    accel = subprocess.run([MATCHLOCK, "diagnose"], capture_output=True, text=True).stdout
    accel = "TCG" if "TCG" in accel else "KVM" if "KVM" in accel else "?"
    # Downloads first, then uploads (nc -e runs `wc -c`, which answers with the count).
    script = (f"for i in $(seq {runs}); do nc -l -p 8080 -e head -c {n} /dev/zero; done; "
              f"for i in $(seq {runs}); do nc -l -p 8080 -e sh -c 'wc -c'; done")
    proc = subprocess.Popen([MATCHLOCK, "run", "--no-network", "-p", f"{PORT}:8080", "--",
                             "sh", "-c", script], stdout=subprocess.DEVNULL)
    try:
        down = [_until_data(lambda: _download(n)) for _ in range(runs)]
        up = [_until_data(lambda: _upload(n)) for _ in range(runs)]
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:  # SIGTERM: matchlock tears the sandbox down
            proc.terminate()
            proc.wait(timeout=60)
    t = time.perf_counter()
    r = subprocess.run([MATCHLOCK, "run", "--", "sh", "-c", f"head -c {n} /dev/zero"],
                       capture_output=True, check=True)
    exec_s = time.perf_counter() - t
    assert len(r.stdout) == n

    def rate(ts: list[float]) -> str:
        return (f"median {mib / statistics.median(ts):.1f} MiB/s "
                f"(min {mib / max(ts):.1f}, max {mib / min(ts):.1f})")

    print(f"accelerator: {accel}; {mib} MiB per transfer, {runs} runs")
    print(f"guest -> host through -p: {rate(down)}")
    print(f"host -> guest through -p: {rate(up)}")
    print(f"for scale, a whole `run` whose stdout is {mib} MiB (boot included): "
          f"{exec_s:.2f} s")


if __name__ == "__main__":
    main()
