#!/usr/bin/env python3
"""Start-up latency and memory of a sandbox, end to end and by phase.

    run_latency.py [--runs N] [--image NAME] [--accel kvm|tcg|auto] [--json FILE]

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

Every figure is labelled with the accelerator that produced it: TCG numbers are never KVM
numbers.
"""

from __future__ import annotations

import argparse
import json
import os
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
    a = ap.parse_args()

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
