"""`matchlock run` served by the fork server against the same tree in-process
(`MATCHLOCK_FORKSERVER=0`) and, with `--before OLD_SRC`, another checkout's `src` (run through
`PYTHONPATH`): wall time of `run -- true` (sealed network when root) and
`run --no-network -- true`, the time from the CLI's start to the VMM's spawn (the sandbox's
`booting` event in the state database), `run -d` until the id, and the CPU each run costs:
the CLI's own, plus, when served, the fork's and its VMM's (the server's reaped children).

    MATCHLOCK_HOME=/tmp/somewhere .venv/bin/python benchmarks/forkserver.py \\
        [--runs N] [--before OLD_SRC] [--image IMAGE --cmd 'python3 -c pass']

Every mode alternates run by run (the same machine load for each); medians (and minima)
in ms. The accelerator is read from the VMM's command line: TCG or KVM, as measured.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
LAUNCHER = HERE / "bin" / "matchlock"


def _state() -> Path:
    from matchlock.paths import state_dir

    return state_dir()


def _servers() -> list[int]:
    """The fork servers of this state dir (not their forks: a fork's parent is a server)."""
    state = os.fsencode(_state())
    found = []
    for e in Path("/proc").iterdir():
        if not e.name.isdigit():
            continue
        try:
            cmd = (e / "cmdline").read_bytes()
        except OSError:
            continue
        if b"matchlock.cli.forkserver" in cmd and state in cmd:
            found.append(int(e.name))

    def parent(pid: int) -> int:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return 0
        return int(stat[stat.rindex(")") + 2:].split()[1])

    return [p for p in found if parent(p) not in found]


def _children_cpu(pid: int) -> float:
    """cutime + cstime of pid (its reaped children), in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def _booting_at(after: float) -> float | None:
    """When the newest sandbox created after `after` reached `booting` (its VMM spawned)."""
    db = _state() / "state.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as c:
        row = c.execute("SELECT at FROM lifecycle WHERE phase = 'booting' AND at >= ? "
                        "ORDER BY at DESC LIMIT 1", (after,)).fetchone()
    return float(row[0]) if row else None


def _mode_env(mode: str, before: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an install has its .pyc files
    if mode == "in-process":
        env["MATCHLOCK_FORKSERVER"] = "0"
    elif mode == "before":
        assert before is not None
        env["PYTHONPATH"] = before
    return env


def _one(mode: str, args: list[str], env: dict[str, str]) -> dict[str, float]:
    servers = _servers() if mode == "served" else []
    cpu0 = sum(_children_cpu(p) for p in servers)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall0 = time.time()
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(LAUNCHER), "run", *args], env=env,
                       capture_output=True, timeout=600)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{mode}: run {args} -> {r.returncode}: {r.stderr.decode()[-500:]}")
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if mode == "served":
        cpu += sum(_children_cpu(p) for p in _servers()) - cpu0
    out = {"wall": wall * 1000, "cpu": cpu * 1000}
    booting = _booting_at(wall0)
    if booting is not None:
        out["to_boot"] = (booting - wall0) * 1000
    if "-d" in args:
        sid = r.stdout.decode().strip()
        global ACCEL
        if ACCEL == "?":
            ACCEL = _accel()
        subprocess.run([sys.executable, str(LAUNCHER), "rm", "-f", sid], env=env,
                       capture_output=True, timeout=120)
    return out


ACCEL = "?"


def _accel() -> str:
    for e in Path("/proc").iterdir():
        try:
            cmd = (e / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"qemu-system-x86_64") and b"-accel" in cmd:
            return cmd[cmd.index(b"-accel") + 1].decode().split(",")[0].upper()
    return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--before", help="another checkout's src, run through PYTHONPATH")
    ap.add_argument("--image", help="also time this image's --cmd")
    ap.add_argument("--cmd", default="python3 -c pass")
    a = ap.parse_args()
    modes = ["served", "in-process"] + (["before"] if a.before else [])
    cases = [("run --no-network -- true", ["--no-network", "--", "true"])]
    if os.geteuid() == 0:
        cases.insert(0, ("run -- true (sealed network)", ["--", "true"]))
        cases.append(("run -d (sealed network), until the id", ["-d"]))
    else:
        cases.append(("run -d --no-network, until the id", ["-d", "--no-network"]))
    if a.image:
        cases.append((f"run --image {a.image} -- {a.cmd}",
                      ["--image", a.image, "--", *shlex.split(a.cmd)]))
    envs = {m: _mode_env(m, a.before) for m in modes}
    for _, args in cases:  # images, root filesystems, templates, a server: made once
        for m in modes:
            _one(m, args, envs[m])
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    srt = _srt()
    load0 = os.getloadavg()[0]
    for _ in range(a.runs):
        for name, args in cases:
            for m in modes:
                results.setdefault((name, m), []).append(_one(m, args, envs[m]))
        if srt is not None:
            t0 = time.perf_counter()
            subprocess.run(srt, capture_output=True, timeout=120, check=True)
            results.setdefault(("srt -c true", "peer"), []).append(
                {"wall": (time.perf_counter() - t0) * 1000, "cpu": 0.0})
    load1 = os.getloadavg()[0]
    print(f"# fork server vs in-process, {a.runs} runs each, interleaved; accelerator "
          f"{ACCEL if ACCEL != '?' else 'not seen'}; {os.cpu_count()} CPUs; "
          f"load {load0:.1f} -> {load1:.1f}")
    print("| case | mode | wall p50 (min) | CLI start to VMM spawn p50 | CPU per run p50 |")
    print("|---|---|---|---|---|")
    for name, _ in cases:
        base = None
        for m in modes:
            xs = results[(name, m)]
            wall = statistics.median(x["wall"] for x in xs)
            low = min(x["wall"] for x in xs)
            boots = [x["to_boot"] for x in xs if "to_boot" in x]
            boot = f"{statistics.median(boots):.1f}" if boots else "-"
            cpu = statistics.median(x["cpu"] for x in xs)
            if m == "in-process":
                base = wall
            print(f"| {name} | {m} | {wall:.0f} ({low:.0f}) | {boot} | {cpu:.0f} |")
        served = statistics.median(x["wall"] for x in results[(name, "served")])
        if base:
            print(f"| {name} | served / in-process | {served / base:.2f}x | | |")
    if ("srt -c true", "peer") in results:
        walls = [x["wall"] for x in results[("srt -c true", "peer")]]
        print(f"| srt -c true (sandbox-runtime, namespaces) | peer | "
              f"{statistics.median(walls):.0f} ({min(walls):.0f}) | | |")


def _srt() -> list[str] | None:
    """`srt -c true` with a settings file that allows nothing, or None without srt."""
    import json
    import shutil
    import tempfile

    srt = shutil.which("srt")
    if srt is None:
        return None
    work = Path(tempfile.mkdtemp(prefix="forkserver-srt-"))
    settings = work / "srt-settings.json"
    settings.write_text(json.dumps({
        "network": {"allowedDomains": [], "deniedDomains": []},
        "filesystem": {"denyRead": [], "allowWrite": [str(work)], "denyWrite": []},
    }))
    return [srt, "-s", str(settings), "-c", "true"]


if __name__ == "__main__":
    main()
