"""Exec streams end to end: stdout (big and small guest writes) and stdin (big and small host
writes) through `matchlock run`, `matchlock exec` on a detached sandbox, and the agent API in
a process of its own; MB/s over the data phase, and CPU seconds per MB of the host processes
(the CLI, the supervisor) and of QEMU (the emulated guest and its devices).

    MATCHLOCK_HOME=/tmp/x .venv/bin/python benchmarks/exec_output.py [--rounds N]
        [--mb N] [--paths run,exec,api] [--cases ...] [--compare OTHER_CHECKOUT]

With --compare, every case runs alternately with this checkout's `src` and OTHER's (each
builds its own agent), and the medians are printed side by side with their ratio. Rates are
bytes over the time from the first to the last byte (stdout) or from the first write to the
command's "end" line (stdin); start-up is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
MB = 1_000_000


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "out" or "in"
    size: int  # bytes
    producer: str = ""  # guest command writing `size` bytes to stdout (out)
    chunk: int = 0  # host write size (in)


def cases(mb: int) -> list[Case]:
    n = mb << 20
    return [
        Case("stdout 1 MiB writes", "out", n,
             f"dd if=/dev/zero bs=1048576 count={mb} 2>/dev/null"),
        Case("stdout 4 KiB writes", "out", n,
             f"dd if=/dev/zero bs=4096 count={n // 4096} 2>/dev/null"),
        Case("stdout 100 B writes", "out", n // 1000 * 100,
             f"dd if=/dev/zero bs=100 count={n // 1000} 2>/dev/null"),
        Case("stdin 1 MiB writes", "in", n, chunk=1 << 20),
        Case("stdin 4 KiB writes", "in", n // 2, chunk=4096),
    ]


# --- CPU accounting ---------------------------------------------------------------------------


def cpu_of(pid: int) -> float:
    """User + system seconds of a live process (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def qemu_under(pid: int) -> int | None:
    for c in children(pid):
        try:
            if b"qemu" in Path(f"/proc/{c}/cmdline").read_bytes()[:200]:
                return c
        except OSError:
            pass
    return None


class Meter:
    """CPU of named processes between start() and stop()."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = {k: v for k, v in pids.items() if v}
        self.t0: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def start(self) -> None:
        self.t0 = {k: cpu_of(p) for k, p in self.pids.items()}

    def stop(self) -> None:
        self.used = {k: cpu_of(p) - self.t0[k] for k, p in self.pids.items()}


# --- one measurement through a CLI process (run / exec) ---------------------------------------


def _guest_cmd(case: Case) -> str:
    if case.kind == "out":
        return case.producer
    return "echo go; cat > /dev/null; echo end; sleep 0.3"


def cli_measure(argv: list[str], env: dict[str, str], case: Case,
                owner: int | None) -> dict[str, float]:
    """Run the CLI (`argv` + the guest command); `owner`: the process owning the VM when it
    is not the CLI itself (the supervisor of a detached sandbox)."""
    proc = subprocess.Popen([*argv, "sh", "-c", _guest_cmd(case)], env=env,
                            stdin=subprocess.PIPE if case.kind == "in" else subprocess.DEVNULL,
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    meter: Meter | None = None

    def make_meter() -> Meter:
        vm_owner = owner or proc.pid
        pids: dict[str, int | None] = {"cli": proc.pid, "qemu": qemu_under(vm_owner)}
        if owner:
            pids["supervisor"] = owner
        return Meter(pids)

    got = 0
    if case.kind == "out":
        first = os.read(fd, 1 << 20)
        t0 = time.perf_counter()
        meter = make_meter()
        meter.start()
        got = len(first)
        while got < case.size and (data := os.read(fd, 1 << 20)):
            got += len(data)
        t1 = time.perf_counter()
        meter.stop()  # before the CLI exits (a `run` takes QEMU with it)
        got += len(proc.stdout.read())
        assert got == case.size, (got, case.size)
    else:
        assert proc.stdin is not None
        buf = b""
        while b"go\n" not in buf:
            buf += os.read(fd, 64)
        meter = make_meter()
        meter.start()
        t0 = time.perf_counter()
        block = bytes(case.chunk)
        sent = 0
        win = proc.stdin.fileno()
        while sent < case.size:
            sent += os.write(win, block[: min(case.chunk, case.size - sent)])
        proc.stdin.close()
        while b"end\n" not in buf:
            data = os.read(fd, 64)
            assert data, buf
            buf += data
        t1 = time.perf_counter()
        meter.stop()
        got = sent
    proc.wait()
    assert proc.returncode == 0, proc.returncode
    secs = t1 - t0
    return {"mbps": got / MB / secs, **{f"cpu_{k}": v / (got / MB) for k, v in
                                          meter.used.items()}}


# --- the agent API in this process (a worker) -------------------------------------------------


def api_worker(case_list: list[Case], rounds: int) -> None:
    """Runs in a child process whose PYTHONPATH picks the checkout; prints JSON lines."""
    from matchlock.guest.client import Output
    from matchlock.guest.protocol import ExecRequest
    from matchlock.image.resolve import resolve_image
    from matchlock.sandbox.core import Sandbox, SandboxOptions

    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    img = resolve_image(None)
    with Sandbox(SandboxOptions(image=img.name, rootfs=img.rootfs)) as sb:
        sb.start()
        qemu = qemu_under(os.getpid())
        for _ in range(rounds):
            for case in case_list:
                meter = Meter({"self": os.getpid(), "qemu": qemu})
                ex = sb.exec(ExecRequest(argv=["sh", "-c", _guest_cmd(case)], env=env,
                                         stdin=case.kind == "in"))
                events = ex.events()
                got = 0
                if case.kind == "out":
                    for ev in events:
                        if isinstance(ev, Output):
                            if not got:
                                t0 = time.perf_counter()
                                meter.start()
                            got += len(ev.data)
                            if got == case.size:
                                t1 = time.perf_counter()
                                meter.stop()
                    assert got == case.size, (got, case.size)
                else:
                    next(events)  # "go"
                    meter.start()
                    t0 = time.perf_counter()
                    block = bytes(case.chunk)
                    for off in range(0, case.size, case.chunk):
                        ex.write_stdin(block[: min(case.chunk, case.size - off)])
                    ex.close_stdin()
                    for ev in events:
                        if isinstance(ev, Output) and b"end" in ev.data:
                            t1 = time.perf_counter()
                            meter.stop()
                    got = case.size
                print(json.dumps({"case": case.name, "mbps": got / MB / (t1 - t0),
                                  **{f"cpu_{k}": v / (got / MB)
                                     for k, v in meter.used.items()}}), flush=True)


# --- driver -----------------------------------------------------------------------------------


def checkout_env(src: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src)
    # `run` in-process: served by the fork server, the owner is a fork that writes to the same
    # stdout the same way, but it is not the CLI's child, so its CPU and QEMU's would not be
    # found here (benchmarks/forkserver.py compares the two start paths).
    env["MATCHLOCK_FORKSERVER"] = "0"
    return env


def cli(env: dict[str, str]) -> list[str]:
    return [sys.executable, "-c", "from matchlock.cli.entry import main; main()"]


def start_detached(env: dict[str, str]) -> tuple[str, int]:
    out = subprocess.run([*cli(env), "run", "-d"], env=env, check=True, capture_output=True,
                         text=True).stdout.split()
    sid = out[-1]
    for _ in range(100):
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    cmd = (p / "cmdline").read_bytes()
                except OSError:
                    continue
                if b"qemu" in cmd[:200] and sid.encode() in cmd:
                    ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    return sid, ppid
        time.sleep(0.1)
    raise SystemExit(f"no VMM found for {sid}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mb", type=int, default=64, help="MiB per big case")
    ap.add_argument("--paths", default="run,exec,api")
    ap.add_argument("--cases", default="", help="comma-separated name prefixes")
    ap.add_argument("--compare", type=Path, help="another checkout to run alternately")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    todo = [c for c in cases(args.mb)
            if not args.cases or any(c.name.startswith(p) for p in args.cases.split(","))]
    if args.worker:
        api_worker(todo, args.rounds)
        return
    checkouts = {"this": HERE / "src"}
    if args.compare:
        checkouts["other"] = args.compare.resolve() / "src"
    envs = {k: checkout_env(v) for k, v in checkouts.items()}
    paths = args.paths.split(",")
    results: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    print(f"load average at start: {os.getloadavg()}; QEMU TCG", flush=True)
    detached: dict[str, tuple[str, int]] = {}
    try:
        if "exec" in paths:
            detached = {k: start_detached(e) for k, e in envs.items()}
        for rnd in range(args.rounds):
            for case in todo:
                for k, env in envs.items():
                    for path in paths:
                        if path == "run":
                            r = cli_measure([*cli(env), "run", "-i", "--no-network", "--"],
                                            env, case, None)
                        elif path == "exec":
                            sid, sup = detached[k]
                            r = cli_measure([*cli(env), "exec", "-i", sid, "--"], env, case,
                                            sup)
                        else:
                            continue
                        results.setdefault((case.name, path, k), []).append(r)
                        print(f"  r{rnd} {k:5} {path:4} {case.name}: " + _fmt(r), flush=True)
        if "api" in paths:
            for rnd in range(args.rounds):
                for k, env in envs.items():
                    proc = subprocess.Popen(
                        [sys.executable, __file__, "--worker", "--rounds", "1", "--mb",
                         str(args.mb), "--cases", args.cases], env=env,
                        stdout=subprocess.PIPE, text=True)
                    assert proc.stdout is not None
                    for line in proc.stdout:
                        r = json.loads(line)
                        name = r.pop("case")
                        results.setdefault((name, "api", k), []).append(r)
                        print(f"  r{rnd} {k:5} api  {name}: " + _fmt(r), flush=True)
                    proc.wait()
    finally:
        for k, (sid, _) in detached.items():
            subprocess.run([*cli(envs[k]), "rm", "-f", sid], env=envs[k],
                           capture_output=True, check=False)
    print(f"\nmedians (QEMU TCG; load average at end: {os.getloadavg()})")
    for case in todo:
        for path in paths:
            row = []
            for k in checkouts:
                rs = results.get((case.name, path, k))
                if rs:
                    med = {f: statistics.median(r.get(f, 0.0) for r in rs) for f in rs[0]}
                    row.append((k, med))
            if not row:
                continue
            line = f"{case.name:22} {path:4} " + " | ".join(f"{k}: {_fmt(m)}" for k, m in row)
            if len(row) == 2:
                line += f" | ratio {row[0][1]['mbps'] / row[1][1]['mbps']:.2f}x"
            print(line)


def _fmt(r: dict[str, float]) -> str:
    cpu = " ".join(f"{k[4:]} {v * 1000:.1f}" for k, v in r.items() if k.startswith("cpu_"))
    return f"{r['mbps']:6.1f} MB/s (CPU ms/MB: {cpu})"


if __name__ == "__main__":
    main()
