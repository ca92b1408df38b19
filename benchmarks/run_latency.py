#!/usr/bin/env python3
"""Start-up latency and memory of a sandbox, end to end and by phase.

    run_latency.py [--runs N] [--image NAME] [--accel kvm|tcg|auto] [--json FILE]
    run_latency.py --against DIR [--runs N] [--image NAME] [--no-network] [-- CMD...]

Both start paths are measured, side by side: restoring a snapshot template (the default once a
template of the machine shape exists) and a cold kernel boot (MATCHLOCK_SNAPSHOTS=0).

1. End to end: `matchlock run [--image X] -- true` as a user types it (Python start-up, image
   lookup, boot, exec, teardown), N runs, p50/p95.
2. Phases, through the Python API in this process, N runs: host preparation, VMM start,
   kernel to agent (the guest's own boot clock), agent ready (SETUP: root, overlay), exec of
   `true`, teardown.
3. Exec round trip on one booted sandbox: `true` exec'ed 50 times; control-channel PING.
4. Memory of one idle sandbox: the VMM's private memory beyond guest RAM (guest RAM is a memfd,
   so it shows up as shmem and is left out) plus the owning process's private memory.

With --against DIR (another checkout of matchlock, e.g. the commit before a change), only the
snapshot path is measured, for both trees in alternation (one `run`, then one start through
the API, per tree and round; the tree that goes first alternates), each from its own `src` on
PYTHONPATH, so both pay the same imports: before/after under the same load. CMD (default
`true`) is what the end-to-end `run` and the timed first exec run.

Every figure is labelled with the accelerator that produced it: TCG numbers are never KVM
numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from matchlock.guest.protocol import ExecRequest
from matchlock.image.resolve import resolve_image
from matchlock.sandbox.core import Sandbox, SandboxOptions
from matchlock.sandbox.network import Egress, NetworkOptions

MATCHLOCK = str(Path(sys.executable).with_name("matchlock"))
PHASES = ("host_prep", "vmm_start", "kernel_to_agent", "restore", "agent_ready", "exec",
          "teardown")
MODES = {"snapshot restore": "1", "cold boot": "0"}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[idx]


def fmt_ms(values: list[float]) -> str:
    return f"{pct(values, 50) * 1000:7.1f} {pct(values, 95) * 1000:7.1f}"


NETWORK = os.geteuid() == 0  # as `run` does: a sealed NIC when root, none otherwise


def egress() -> Egress | None:
    return Egress(NetworkOptions()) if NETWORK else None


HERE = Path(__file__).resolve().parents[1]
_CLI = ("import sys; from matchlock.cli.entry import main; sys.argv[0] = 'matchlock'; "
        "sys.exit(main())")
AB_PHASES = ("host_prep", "vmm_start", "restore", "agent_ready", "exec", "teardown")


def _tree_env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree / "src"), "MATCHLOCK_SNAPSHOTS": "1"}


def _run_args(image: str | None, network: bool, cmd: list[str]) -> list[str]:
    return ["run", *(["--image", image] if image else []),
            *([] if network else ["--no-network"]), "--", *cmd]


def worker(image: str | None, network: bool, cmd: list[str]) -> None:
    """One start through the API (this process's tree), phases as JSON on stdout."""
    resolved = resolve_image(image)
    sb = Sandbox(SandboxOptions(image=resolved.name, rootfs=resolved.rootfs,
                                egress=Egress(NetworkOptions()) if network else None))
    with sb:
        sb.start()
        t = time.perf_counter()
        for _ev in sb.exec(ExecRequest(argv=cmd, env=["PATH=/usr/local/bin:/usr/bin:/bin"]
                                       )).events():
            pass
        sb.timings.add("exec", time.perf_counter() - t)
    print(json.dumps({"accel": sb.accel, "restored": sb.restored, **sb.timings.phases}))


def against(other: Path, runs: int, image: str | None, network: bool, cmd: list[str]) -> None:
    trees = {"before": other.resolve(), "after": HERE}
    e2e: dict[str, list[float]] = {k: [] for k in trees}
    ph: dict[str, dict[str, list[float]]] = {k: {p: [] for p in AB_PHASES} for k in trees}
    accel = set()
    loads = [os.getloadavg()[0]]
    me = [sys.executable, str(Path(__file__).resolve())]
    wargs = ["--worker", *(["--image", image] if image else []),
             *([] if network else ["--no-network"]), "--", *cmd]
    for r in range(runs + 1):  # round 0 warms up (and builds templates): not counted
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for name in order:
            env = _tree_env(trees[name])
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", _CLI, *_run_args(image, network, cmd)],
                           env=env, check=True, capture_output=True)
            dt = time.perf_counter() - t
            out = subprocess.run(me + wargs, env=env, check=True, capture_output=True).stdout
            got = json.loads(out.decode().strip().splitlines()[-1])
            if r == 0:
                continue
            accel.add(got["accel"])
            if not got["restored"]:
                print(f"# warning: {name} did not restore a template", file=sys.stderr)
            e2e[name].append(dt)
            for p in AB_PHASES:
                ph[name][p].append(got.get(p, 0.0))
        loads.append(os.getloadavg()[0])
    print(f"# snapshot start-up, before ({trees['before']}) vs after ({HERE}); accelerator: "
          f"{'/'.join(a.upper() for a in sorted(accel))}; {runs} interleaved rounds; "
          f"image {image or 'built-in busybox'}; network: {'sealed NIC' if network else 'none'}; "
          f"cmd {' '.join(cmd)}; 1-min load {min(loads):.2f}..{max(loads):.2f}")
    print(f"{'p50 ms (min)':<26} {'before':>16} {'after':>16} {'after/before':>12}")
    rows = [("run, end to end", e2e["before"], e2e["after"])]
    rows += [(f"  phase: {p}", ph["before"][p], ph["after"][p]) for p in AB_PHASES]
    for title, b, a in rows:
        mb, ma = statistics.median(b) * 1000, statistics.median(a) * 1000
        print(f"{title:<26} {mb:8.1f} ({min(b) * 1000:5.0f}) {ma:8.1f} ({min(a) * 1000:5.0f}) "
              f"{ma / mb if mb else 0:12.2f}")


def end_to_end(runs: int, image: str | None, accel: str | None) -> list[float]:
    args = [MATCHLOCK, "run"]
    if image:
        args += ["--image", image]
    if accel:
        args += ["--accel", accel]
    args += ["--", "true"]
    subprocess.run(args, check=True, capture_output=True)  # warm caches (rootfs, page cache)
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True)
        out.append(time.perf_counter() - t)
    return out


def phases(runs: int, image: str | None, accel: str | None) -> tuple[dict[str, list[float]], str]:
    resolved = resolve_image(image)
    got: dict[str, list[float]] = {p: [] for p in PHASES}
    used = ""
    for _ in range(runs):
        sb = Sandbox(SandboxOptions(image=resolved.name, rootfs=resolved.rootfs, accel=accel,
                                    egress=egress()))
        with sb:
            sb.start()
            t = time.perf_counter()
            ex = sb.exec(ExecRequest(argv=["true"], env=["PATH=/usr/bin:/bin"]))
            for _ev in ex.events():
                pass
            sb.timings.add("exec", time.perf_counter() - t)
            used = sb.accel
        for name in PHASES:
            got[name].append(sb.timings.phases.get(name, 0.0))
    return got, used


def _private_kib(pid: int) -> dict[str, int]:
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[key] = int(parts[0])
    return fields


def round_trips_and_memory(image: str | None, accel: str | None) -> dict[str, float]:
    resolved = resolve_image(image)
    opts = SandboxOptions(image=resolved.name, rootfs=resolved.rootfs, accel=accel,
                          egress=egress())
    with Sandbox(opts) as sb:
        sb.start()
        execs = []
        for _ in range(50):
            t = time.perf_counter()
            for _ev in sb.exec(ExecRequest(argv=["true"], env=["PATH=/usr/bin:/bin"])).events():
                pass
            execs.append(time.perf_counter() - t)
        pings = [sb.conn.ping() for _ in range(200)]
        time.sleep(2)
        assert sb._proc is not None
        vmm = _private_kib(sb._proc.pid)
        own = _private_kib(os.getpid())
    vmm_private = vmm["Private_Clean"] + vmm["Private_Dirty"] - vmm.get("Pss_Shmem", 0)
    return {
        "exec_p50_ms": pct(execs, 50) * 1000,
        "exec_p95_ms": pct(execs, 95) * 1000,
        "ping_p50_us": pct(pings, 50) * 1e6,
        "vmm_private_mib": vmm_private / 1024,
        "vmm_anon_mib": vmm["Anonymous"] / 1024,
        "vmm_file_mib": vmm.get("Pss_File", 0) / 1024,
        "guest_ram_touched_mib": vmm.get("Pss_Shmem", 0) / 1024,
        "owner_private_mib": (own["Private_Clean"] + own["Private_Dirty"]) / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--image", default=None)
    ap.add_argument("--accel", default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--against", type=Path, default=None,
                    help="another checkout: before/after, interleaved (snapshot path only)")
    ap.add_argument("--no-network", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("cmd", nargs="*", default=["true"])
    a = ap.parse_args()
    cmd = a.cmd or ["true"]
    if a.worker:
        worker(a.image, NETWORK and not a.no_network, cmd)
        return
    if a.against:
        against(a.against, a.runs, a.image, NETWORK and not a.no_network, cmd)
        return

    results: dict[str, dict[str, object]] = {}
    used = ""
    for mode, flag in MODES.items():
        os.environ["MATCHLOCK_SNAPSHOTS"] = flag
        e2e = end_to_end(a.runs, a.image, a.accel)
        ph, used = phases(a.runs, a.image, a.accel)
        results[mode] = {"end_to_end": e2e, "phases": ph}
    os.environ["MATCHLOCK_SNAPSHOTS"] = "1"
    rt = round_trips_and_memory(a.image, a.accel)
    label = used.upper()
    print(f"# matchlock start-up, accelerator: {label}, {a.runs} runs, image: "
          f"{a.image or 'built-in busybox'}, {os.cpu_count()} host cores, "
          f"network: {'sealed NIC' if NETWORK else 'none'}")
    print(f"{'measure (p50 / p95 ms)':<28} " + " ".join(f"{m:>17}" for m in MODES))
    rows: list[tuple[str, str]] = [("run true, end to end", "end_to_end")]
    rows += [("  phase: " + name, name) for name in PHASES]
    for title, field in rows:
        cells = []
        for mode in MODES:
            r = results[mode]
            values = r["end_to_end"] if field == "end_to_end" else r["phases"][field]  # type: ignore[index]
            assert isinstance(values, list)
            cells.append(f"{pct(values, 50) * 1000:8.1f} {pct(values, 95) * 1000:8.1f}")
        print(f"{title:<28} " + " ".join(cells))
    print(f"{'exec true (booted VM)':<28} {rt['exec_p50_ms']:7.1f} {rt['exec_p95_ms']:7.1f}")
    print(f"{'control PING round trip':<28} {rt['ping_p50_us'] / 1000:7.2f}")
    print(f"# memory of one idle sandbox ({label}): VMM private beyond guest RAM "
          f"{rt['vmm_private_mib']:.1f} MiB (anon {rt['vmm_anon_mib']:.1f}, file "
          f"{rt['vmm_file_mib']:.1f}), owner process private {rt['owner_private_mib']:.1f} MiB, "
          f"guest RAM touched {rt['guest_ram_touched_mib']:.1f} MiB")
    if a.json:
        a.json.write_text(json.dumps({"accel": used, "modes": results, **rt}, indent=2))


if __name__ == "__main__":
    main()
