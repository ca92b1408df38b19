"""Exec latency on a running sandbox, from the outside in:

- `Sandbox.exec(["true"])` in the process that owns the sandbox (no socket, no supervisor);
- over a detached sandbox's `control.sock` from a process that is already running: the whole
  client call (registry lookup + connect + exec + EXIT), and the exec alone on a connection
  made beforehand;
- the SDK's `exec("true")` (`sh -c true` through `matchlock rpc`), quiet and with two busy
  loops on the host (load ~2 more);
- `matchlock exec ID -- true` from a fresh process;
- `run -d` until the id is printed against `run -- true`, interleaved.

    MATCHLOCK_HOME=/tmp/somewhere .venv/bin/python benchmarks/exec_latency.py [N]
        [--baseline SRC] [--rounds R]

`--baseline SRC`: also measure the tree whose `src` directory is SRC (e.g. a worktree of the
commit before a change), interleaved round by round with this one; each side builds its own
guest agent. Figures: p50 / p90 / min in ms, the load average around each round, and the
accelerator the VMs ran with.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

MATCHLOCK = str(Path(sys.executable).with_name("matchlock"))


def _timed(n: int, fn: Callable[[], object], warm: int = 2) -> list[float]:
    for _ in range(warm):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _core(n: int) -> tuple[list[float], str]:
    from matchlock.guest.protocol import ExecRequest
    from matchlock.image.resolve import resolve_image
    from matchlock.sandbox import boot
    from matchlock.sandbox.core import Sandbox, SandboxOptions

    img = resolve_image(None)
    boot.artifacts()
    with Sandbox(SandboxOptions(image=img.name, rootfs=img.rootfs)) as sb:
        sb.start()

        def one() -> None:
            ex = sb.exec(ExecRequest(argv=["true"], env=["PATH=/bin:/usr/bin"], cwd="/"))
            for _ev in ex.events():
                pass
            assert ex.status is not None and ex.status.code == 0

        return _timed(n, one, warm=3), sb.accel


def _control(n: int, sid: str) -> tuple[list[float], list[float]]:
    from matchlock.sandbox import wire
    from matchlock.sandbox.control import connect, frames

    def exec_on(s: Any) -> None:
        s.sendall(wire.encode_json(wire.REQUEST, {"op": "exec", "argv": ["true"]}))
        for f in frames(s, wire.Decoder()):
            if f.type == wire.EXIT:
                assert f.json()["code"] == 0
                return
        raise AssertionError("no EXIT")

    def whole() -> None:
        s = connect(sid)
        exec_on(s)
        s.close()

    full = _timed(n, whole)
    alone = []
    for _ in range(n):
        s = connect(sid)
        t = time.perf_counter()
        exec_on(s)
        alone.append(time.perf_counter() - t)
        s.close()
    return full, alone


def _spin(stop: Any) -> None:
    while not stop.is_set():
        pass


@contextlib.contextmanager
def _load(workers: int) -> Iterator[None]:
    stop = multiprocessing.Event()
    procs = [multiprocessing.Process(target=_spin, args=(stop,)) for _ in range(workers)]
    for p in procs:
        p.start()
    try:
        yield
    finally:
        stop.set()
        for p in procs:
            p.join()


def _sdk(n: int) -> tuple[list[float], list[float]]:
    from matchlock import Client, Config, Sandbox

    c = Client(Config(binary_path=MATCHLOCK))
    c.start()
    try:
        c.launch(Sandbox("matchlock-builtin:busybox"))
        quiet = _timed(n, lambda: c.exec("true"), warm=3)
        with _load(2):
            time.sleep(0.5)
            loaded = _timed(n, lambda: c.exec("true"), warm=1)
        c.close()
    finally:
        c.remove()
    return quiet, loaded


def worker(n: int) -> dict[str, Any]:
    """One round of every measurement with this process's tree; JSON on stdout."""
    res: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    res["core"], res["accel"] = _core(n)
    sid = subprocess.run([MATCHLOCK, "run", "-d"], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        res["control"], res["control_exec"] = _control(n, sid)
        cli = []
        for _ in range(n):
            t = time.perf_counter()
            subprocess.run([MATCHLOCK, "exec", sid, "--", "true"], check=True)
            cli.append(time.perf_counter() - t)
        res["cli"] = cli
    finally:
        subprocess.run([MATCHLOCK, "rm", "-f", sid], check=True, capture_output=True)
    res["sdk"], res["sdk_loaded"] = _sdk(n)
    res["load_after"] = os.getloadavg()[0]
    return res


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


ROWS = [
    ("core", "Sandbox.exec(true) in the owning process"),
    ("control_exec", "exec over control.sock, connected beforehand"),
    ("control", "control.sock client call (lookup + connect + exec)"),
    ("sdk", "SDK exec(\"true\") (sh -c true via rpc)"),
    ("sdk_loaded", "SDK exec(\"true\"), 2 busy loops on the host"),
    ("cli", "`matchlock exec ID -- true`, fresh process"),
]


def _stats(xs: list[float]) -> str:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, int(len(xs) * 0.9))]
    return f"{statistics.median(xs) * 1e3:6.1f} {p90 * 1e3:6.1f} {xs[0] * 1e3:6.1f}"


def _run_worker(n: int, src: str | None) -> dict[str, Any]:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = src  # ahead of the editable install's path
    out = subprocess.run([sys.executable, __file__, "--worker", str(n)], check=True,
                         capture_output=True, text=True, env=env).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int, nargs="?", default=20)
    ap.add_argument("--baseline", help="src directory of the tree to compare with")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--no-starts", action="store_true", help="skip run -d against run -- true")
    a = ap.parse_args()
    if a.worker is not None:
        print(json.dumps(worker(a.worker)))
        return
    sides: list[tuple[str, str | None]] = [("this tree", None)]
    if a.baseline:
        sides.insert(0, ("baseline", a.baseline))
    got: dict[str, dict[str, Any]] = {name: {} for name, _ in sides}
    for r in range(a.rounds):
        for name, src in sides if r % 2 == 0 else sides[::-1]:
            res = _run_worker(a.n, src)
            acc = got[name]
            for key, _ in ROWS:
                acc.setdefault(key, []).extend(res[key])
            acc.setdefault("loads", []).extend([res["load_before"], res["load_after"]])
            acc["accel"] = res["accel"].upper()
    print(f"exec latency, n={a.n} per round, {a.rounds} round(s); ms: p50 p90 min")
    for name, _ in sides:
        acc = got[name]
        loads = acc["loads"]
        print(f"\n{name} ({acc['accel']}, load average {min(loads):.2f}-{max(loads):.2f}):")
        for key, label in ROWS:
            print(f"  {label:52s} {_stats(acc[key])}")
    if a.baseline:
        print("\nratio this tree / baseline (p50):")
        for key, label in ROWS:
            old, new = (statistics.median(got[s][key]) for s in ("baseline", "this tree"))
            print(f"  {label:52s} {new / old:5.2f}")
    if not a.no_starts:
        detached, oneshot = _starts(max(5, a.n // 2))
        for label, xs in (("run -d until the id is printed", detached),
                          ("run -- true (same run, interleaved)", oneshot)):
            print(f"{label}: ms p50 p90 min {_stats(xs)} (n={len(xs)})")


if __name__ == "__main__":
    main()
