"""Per-sandbox host cost: memory of a detached sandbox, the network's set-up CPU, and 16
sandboxes at once against sandbox-runtime (`srt`).

    MATCHLOCK_HOME=/tmp/somewhere .venv/bin/python benchmarks/footprint.py \
        [--runs N] [--before OLD_SRC] [--skip-concurrent]

1. Memory (`smaps`, 3 s after an exec that read the mount): `run -d` without a network
   (`--no-network`), with one (root: the sealed NIC, firewall, resolver, CA and proxy), and with
   one plus one mount (`-v DIR:/workspace/data`). For the supervisor (the owner process):
   private dirty, Pss, anonymous; for QEMU: private dirty, the guest RAM the guest touched
   (its RAM mapping's resident pages), TCG's translation buffer, and the rest. "Beyond guest
   RAM" = supervisor private dirty + QEMU private dirty - guest RAM private dirty.
2. Network set-up CPU: utime+stime of the supervisor once the sandbox is ready, with and
   without the network (the difference is the network's cost in the owner), and in a fresh
   process the CPU of the network's steps alone (imports, namespace + TAP, firewall +
   resolver, CA + proxy).
3. 16 concurrent `matchlock run -- sh -c 'sleep 2'` against 16 concurrent
   `srt -c 'sleep 2'`, alternating, and their ratio.

`--before OLD_SRC` runs every measurement also with `PYTHONPATH=OLD_SRC` (another checkout's
`src`), interleaved with this tree's, and prints both. Every figure is marked with the
accelerator (read back from the VMM's command line) and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent / "src"
# The executable's path (cli/entry.py, as bin/matchlock runs it), not `python -m
# matchlock.cli.main` (click alone): a user's `run` goes to the fork server from there.
ML = [sys.executable, "-c", "from matchlock.cli.entry import main; main()"]
MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")
CONCURRENT = 16


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class Tree:
    def __init__(self, label: str, src: Path) -> None:
        self.label = label
        self.src = src
        self.env = {**os.environ, "PYTHONPATH": str(src)}

    def ml(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        r = subprocess.run([*ML, *args], env=self.env,
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"matchlock {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout


# --- memory ----------------------------------------------------------------------------------


def smaps(pid: int) -> list[dict[str, object]]:
    maps: list[dict[str, object]] = []
    cur: dict[str, object] = {}
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = MAPPING.match(line)
        if m:
            cur = {"size": (int(m[2], 16) - int(m[1], 16)) // 1024, "perm": m[3],
                   "path": m[4].strip()}
            maps.append(cur)
            continue
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            cur[key] = int(parts[0])
    return maps


def rollup(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0])
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def accel_of(pid: int) -> str:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    for i, a in enumerate(argv):
        if a == b"-accel" and i + 1 < len(argv):
            return argv[i + 1].decode().split(",")[0].upper()
    return "?"


LIST_MOUNT = "ls -la /workspace/data >/dev/null 2>&1; true"
# A name lookup (NXDOMAIN: nothing is allowed) and a refused HTTP request: the resolver and
# the proxy have served once.
USE_NETWORK = ("nslookup example.com >/dev/null 2>&1; wget -q -T 3 -O /dev/null "
               "http://example.com/ >/dev/null 2>&1; true")


def sandbox_memory(tree: Tree, flags: list[str], script: str = LIST_MOUNT,
                   memory_mb: int = 512) -> dict[str, float]:
    t = time.perf_counter()
    sid = tree.ml("run", "-d", *flags).strip()
    ready = time.perf_counter() - t
    try:
        info = json.loads(tree.ml("inspect", sid))
        owner, vmm = info["owner"]["pid"], info["vmm"]["pid"]
        sup_cpu = cpu_seconds(owner)
        tree.ml("exec", sid, "--", "sh", "-c", script)
        time.sleep(3)
        sup, q = rollup(owner), rollup(vmm)
        ram = tcg = 0
        for m in smaps(vmm):
            size, perm, path = m["size"], str(m["perm"]), str(m["path"])
            if size == memory_mb * 1024 and ("memory-backend" in path or path.endswith(".ram")
                                             or "template" in path):
                ram = int(m.get("Private_Dirty", 0))  # type: ignore[call-overload]
            elif not path and "x" in perm and isinstance(size, int) and size >= 8 << 10:
                tcg += int(m.get("Rss", 0))  # type: ignore[call-overload]
        threads = len(os.listdir(f"/proc/{owner}/task"))
        accel = accel_of(vmm)
    finally:
        tree.ml("rm", "-f", sid, check=False)
    mib = 1024.0
    return {
        "ready_s": ready, "sup_cpu_s": sup_cpu, "threads": threads,
        "sup_private_dirty": sup["Private_Dirty"] / mib, "sup_pss": sup["Pss"] / mib,
        "sup_anon": sup["Anonymous"] / mib,
        "qemu_private_dirty": q["Private_Dirty"] / mib, "guest_ram": ram / mib,
        "tcg": tcg / mib, "qemu_other": (q["Private_Dirty"] - ram - tcg) / mib,
        "beyond_ram": (sup["Private_Dirty"] + q["Private_Dirty"] - ram) / mib,
        "accel": accel,  # type: ignore[dict-item]
    }


MEM_KEYS = ("sup_private_dirty", "sup_pss", "sup_anon", "qemu_private_dirty", "guest_ram", "tcg",
            "qemu_other", "beyond_ram", "sup_cpu_s", "ready_s", "threads")


def memory(trees: list[Tree], runs: int) -> None:
    mount = Path(tempfile.mkdtemp(prefix="footprint-"))
    (mount / "hello.txt").write_text("hello\n")
    shapes = {
        "-d --no-network": (["--no-network"], LIST_MOUNT),
        "-d (network)": ([], LIST_MOUNT),
        "-d (network, one lookup + one request)": ([], USE_NETWORK),
        "-d (network) -v DIR:/workspace/data": (["-v", f"{mount}:/workspace/data"], LIST_MOUNT),
    }
    # One discarded run per shape and tree: the first run of a shape may cold-boot to save
    # its template.
    for tree in trees:
        for flags, script in shapes.values():
            sandbox_memory(tree, flags, script)
    got: dict[tuple[str, str], list[dict[str, float]]] = {}
    for _ in range(runs):
        for shape, (flags, script) in shapes.items():
            for tree in trees:
                got.setdefault((shape, tree.label), []).append(
                    sandbox_memory(tree, flags, script))
    shutil.rmtree(mount, ignore_errors=True)
    accel = {str(r["accel"]) for rs in got.values() for r in rs}
    print(f"\n## Memory per detached sandbox (MiB, median of {runs}; accel {'/'.join(accel)}; "
          f"load {load()})")
    print("| shape | tree | " + " | ".join(MEM_KEYS) + " |")
    print("|---|---|" + "---|" * len(MEM_KEYS))
    for (shape, label), rs in got.items():
        cells = [f"{statistics.median(float(r[k]) for r in rs):.3g}" for k in MEM_KEYS]
        print(f"| {shape} | {label} | " + " | ".join(cells) + " |")


# --- network set-up CPU ----------------------------------------------------------------------

_STEPS = r"""
import json, tempfile, time
from pathlib import Path
cpu = time.process_time


def private_dirty():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1]) / 1024


def one(label, keep):
    m0, c0 = private_dirty(), cpu()
    from matchlock.sandbox.network import Egress, NetworkOptions
    e = Egress(NetworkOptions())
    c1 = cpu()
    e.open_link()
    c2 = cpu()
    e.start_services("vm-" + label, label, Path(tempfile.mkdtemp()))
    e.wait_ready()
    c3 = cpu()
    e.ca_pem() if hasattr(e, "ca_pem") else e.ca_files(None)  # before 972d609: ca_files
    c4 = cpu()
    keep.append(e)
    return {"options": c1 - c0, "netns+tap": c2 - c1, "firewall+resolver": c3 - c2,
            "ca+proxy": c4 - c3, "total": c4 - c0, "MiB": private_dirty() - m0}


keep = []
first = one("first", keep)
time.sleep(0.3)  # the first one's background thread is done; it stays up, as a neighbour
second = one("second", keep)
for e in keep:
    e.close()
print(json.dumps({"first": first, "second": second}))
"""


def setup_cpu(trees: list[Tree], runs: int) -> None:
    """The first sandbox's network in a fresh process (what every owner pays today, imports
    included) and a second one in the same process (what a process shared by several
    sandboxes would pay per sandbox). CPU of this process only: `nft` is a child."""
    got: dict[tuple[str, str], list[dict[str, float]]] = {}
    for _ in range(runs):
        for tree in trees:
            r = subprocess.run([sys.executable, "-c", _STEPS], env=tree.env, check=True,
                               capture_output=True, text=True)
            for which, row in json.loads(r.stdout).items():
                got.setdefault((tree.label, which), []).append(row)
    print(f"\n## Network set-up CPU in the owner (ms; MiB private dirty; median of {runs}; "
          f"load {load()})")
    keys = list(next(iter(got.values()))[0])
    print("| tree | sandbox in the process | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for (label, which), rs in got.items():
        cells = [f"{statistics.median(r[k] for r in rs) * (1 if k == 'MiB' else 1000):.3g}"
                 for k in keys]
        print(f"| {label} | {which} | " + " | ".join(cells) + " |")


# --- 16 at once ------------------------------------------------------------------------------


def _wave(argvs: list[list[str]], env: dict[str, str], cwd: str | None = None) -> float:
    t = time.perf_counter()
    procs = [subprocess.Popen(a, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for a in argvs]
    for p in procs:
        _, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"{argvs[0][:3]} failed: {err.decode(errors='replace')[-300:]}")
    return time.perf_counter() - t


def concurrent(trees: list[Tree], runs: int) -> None:
    srt = shutil.which("srt")
    work = Path(tempfile.mkdtemp(prefix="footprint-srt-"))
    settings = work / "srt-settings.json"
    settings.write_text(json.dumps({
        "network": {"allowedDomains": [], "deniedDomains": []},
        "filesystem": {"denyRead": [], "allowWrite": [str(work)], "denyWrite": []},
    }))
    got: dict[str, list[float]] = {}
    for _ in range(runs):
        for tree in trees:
            argv = [*ML, "run", "--", "sh", "-c", "sleep 2"]
            got.setdefault(f"matchlock ({tree.label})", []).append(
                _wave([argv] * CONCURRENT, tree.env))
        argv = [*ML, "run", "--no-network", "--", "sh", "-c", "sleep 2"]
        got.setdefault(f"matchlock --no-network ({trees[-1].label})", []).append(
            _wave([argv] * CONCURRENT, trees[-1].env))
        if srt is not None:
            argv = [srt, "-s", str(settings), "-c", "sleep 2"]
            # Not in the writable directory: 16 srt started there at once race to make their
            # mount points in it (bwrap: "Can't create file at …/.claude/agents").
            got.setdefault("srt", []).append(_wave([argv] * CONCURRENT, dict(os.environ),
                                                   cwd="/"))
    shutil.rmtree(work, ignore_errors=True)
    print(f"\n## {CONCURRENT} concurrent `run -- sh -c 'sleep 2'` (wall s, median of {runs}; "
          f"TCG; load {load()})")
    srt_p50 = statistics.median(got["srt"]) if "srt" in got else None
    for label, xs in got.items():
        ratio = f", {statistics.median(xs) / srt_p50:.2f}x srt" if srt_p50 else ""
        print(f"- {label}: {statistics.median(xs):.2f} s (all: "
              f"{', '.join(f'{x:.2f}' for x in xs)}){ratio}")
    if srt is None:
        print("- srt: not installed (npm install -g @anthropic-ai/sandbox-runtime; it needs "
              "bubblewrap, socat and ripgrep)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--before", type=Path, help="another checkout's src, measured interleaved")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-setup", action="store_true")
    ap.add_argument("--skip-concurrent", action="store_true")
    a = ap.parse_args()
    trees = [Tree("after", HERE)]
    if a.before is not None:
        trees.insert(0, Tree("before", a.before.resolve()))
    print(f"# footprint ({os.uname().nodename}, {os.cpu_count()} cores, load {load()})")
    if not a.skip_setup:
        setup_cpu(trees, max(a.runs, 5))
    if not a.skip_memory:
        memory(trees, a.runs)
    if not a.skip_concurrent:
        concurrent(trees, a.runs)


if __name__ == "__main__":
    main()
