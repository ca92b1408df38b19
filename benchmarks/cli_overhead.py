"""The CLI's own process overhead, before and after, interleaved: `matchlock --version`,
`matchlock exec ID -- true` on a detached sandbox (a fresh process each), and `matchlock run`
up to the point where the VM would boot (the stored built-in image; `--no-network`, and with
a network when run as root), each as a fresh interpreter.

    git archive main src | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    MATCHLOCK_HOME=/tmp/somewhere .venv/bin/python benchmarks/cli_overhead.py \\
        --before /tmp/before/src [-n 50]

Each tree runs through the executable it installs, by this interpreter with the tree first
on PYTHONPATH, after `compileall` (a wheel install has its .pyc files; a
PYTHONDONTWRITEBYTECODE environment would otherwise compile every module on every start):
before, pip's console-script template (which imports `re` before our code); after,
bin/matchlock; the after tree through pip's template too, for comparison. The exec rows talk
to one sandbox started by the current tree. The run rows go through `cli/entry.py` with
`resolve_image` stopped once the image is resolved and the boot artifacts not checked: what
the process costs before QEMU starts (the benchmark stores the built-in image first).
Medians of wall time and of the child's CPU time (user+sys, less sensitive to a shared
machine); the exec includes the guest's own exec of `true` (TCG on machines without KVM).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

AFTER_SRC = Path(__file__).resolve().parent.parent / "src"
# pip's generated script for `matchlock = "matchlock.cli.entry:main"`, as installed.
PIP_SCRIPT = """# -*- coding: utf-8 -*-
import re
import sys
from matchlock.cli.entry import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""
LAUNCHER = AFTER_SRC.parent / "bin" / "matchlock"
# `matchlock run ARGS`, stopped where the VM would boot (as tests/unit/test_cli_imports.py).
RUN_TO_BOOT = """
import sys
from matchlock.image import resolve
from matchlock.sandbox import boot
real = resolve.resolve_image
def stop(*a, **kw):
    real(*a, **kw)
    raise SystemExit(0)
resolve.resolve_image = stop
boot.artifacts = lambda: None
sys.argv = ["matchlock", "run", *sys.argv[1:]]
from matchlock.cli.entry import main
main()
"""

def _timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", type=Path, required=True, help="the old tree's src directory")
    ap.add_argument("-n", type=int, default=50)
    a = ap.parse_args()
    trees = {"before": a.before.resolve(), "after": AFTER_SRC}
    for src in trees.values():
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(src / "matchlock")],
                       check=True)
    tmp = Path(tempfile.mkdtemp(prefix="ml-cli-overhead-"))
    pip_script = tmp / "matchlock"
    pip_script.write_text(PIP_SCRIPT)
    exe = {"before": str(pip_script), "after": str(LAUNCHER)}
    envs = {k: {**os.environ, "PYTHONPATH": str(src)} for k, src in trees.items()}
    py = sys.executable
    sid = subprocess.run([py, str(pip_script), "run", "-d"], env=envs["after"], check=True,
                         capture_output=True, text=True).stdout.strip()
    subprocess.run([py, "-c", "from matchlock.image.resolve import resolve_image\n"
                    "resolve_image(None)"], env=envs["after"], check=True,
                   stdout=subprocess.DEVNULL)
    cases: list[tuple[str, list[str], dict[str, str]]] = [
        ("python -c pass (floor)", [py, "-c", "pass"], envs["after"]),
    ]
    for name, args in (("--version", ["--version"]), ("exec ID -- true", ["exec", sid, "--",
                                                                          "true"])):
        for tree in trees:
            cases.append((f"{name} [{tree}]", [py, exe[tree], *args], envs[tree]))
        cases.append((f"{name} [after, pip's script]", [py, str(pip_script), *args],
                      envs["after"]))
    run_rows = [("run --no-network -- true, to boot", ["--no-network", "--", "true"])]
    if os.geteuid() == 0:  # as root a plain run gets a network (an Egress)
        run_rows.append(("run -- true (network), to boot", ["--", "true"]))
    for name, args in run_rows:
        for tree in trees:
            cases.append((f"{name} [{tree}]", [py, "-c", RUN_TO_BOOT, *args], envs[tree]))
    load0 = os.getloadavg()
    walls: dict[str, list[float]] = {c[0]: [] for c in cases}
    cpus: dict[str, list[float]] = {c[0]: [] for c in cases}
    try:
        for _ in range(a.n):
            for name, argv, env in cases:
                w, c = _timed(argv, env)
                walls[name].append(w)
                cpus[name].append(c)
    finally:
        subprocess.run([py, str(pip_script), "rm", "-f", sid], env=envs["after"],
                       capture_output=True)
    load1 = os.getloadavg()
    print(f"n={a.n} interleaved; load average {load0[0]:.2f} -> {load1[0]:.2f}; "
          f"exec rows include the guest's exec (TCG when /dev/kvm is not used)")
    med = {k: statistics.median(v) * 1e3 for k, v in walls.items()}
    cpu = {k: statistics.median(v) * 1e3 for k, v in cpus.items()}
    for name in walls:
        print(f"{name:55s} p50 {med[name]:6.1f} ms  min {min(walls[name]) * 1e3:6.1f} ms  "
              f"cpu p50 {cpu[name]:6.1f} ms")
    for name in ("--version", "exec ID -- true", *(r[0] for r in run_rows)):
        b, af = med[f"{name} [before]"], med[f"{name} [after]"]
        cb, ca = cpu[f"{name} [before]"], cpu[f"{name} [after]"]
        print(f"{name}: before -> after wall p50 {b:.1f} -> {af:.1f} ms (x{b / af:.2f}), "
              f"cpu p50 {cb:.1f} -> {ca:.1f} ms (x{cb / ca:.2f})")


if __name__ == "__main__":
    main()
