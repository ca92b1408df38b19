"""Warm pool (`matchlock.Pool`) against cold start through this project's SDK.

    MATCHLOCK_HOME=/tmp/somewhere .venv/bin/python benchmarks/pool.py [--runs N] [--network]

Interleaved in one run, `--runs` times each:
- cold: `Client().start()` + `launch(Sandbox(busybox))` (rpc process spawn, create, boot,
  set-up), then the first `exec("true")`;
- pool: `Client(pool=pool).launch(...)` with a member ready (the pool is refilled, untimed,
  before each hand-out: the steady state of a pool that is not drained), then the first
  `exec("true")`.
Plus the CPU an idle member's VMM uses while paused, against an idle running sandbox's.
`--network` adds an allow-list (the proxy, DNS, CA and namespace are set up per member too).
`--cli`: the same for the CLI: cold `matchlock run -d` against `matchlock run -d --pool NAME`
with `matchlock pool --size 1 NAME` running (each until the id is printed; CLI start included).
Every figure carries the accelerator and the load averages before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from matchlock import Client, Config, Pool, Sandbox
from sdk import accel_of_running, load

MATCHLOCK = str(Path(sys.executable).with_name("matchlock"))
CONFIG = Config(binary_path=MATCHLOCK)
IMAGE = "matchlock-builtin:busybox"


def box(network: bool) -> Sandbox:
    sb = Sandbox(IMAGE)
    return sb.allow_host("api.example.test") if network else sb


def vmm_cpu(vm_id: str) -> float:
    """CPU seconds (user + system) of the VMM of sandbox `vm_id` so far."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            if b"qemu-system" not in cmd or vm_id.encode() not in cmd:
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    raise RuntimeError(f"no VMM for {vm_id}")


def idle_cpu(vm_id: str, seconds: float = 3.0) -> float:
    before = vmm_cpu(vm_id)
    time.sleep(seconds)
    return (vmm_cpu(vm_id) - before) / seconds


def one(client: Client, network: bool) -> tuple[float, float]:
    t = time.perf_counter()
    client.start()
    client.launch(box(network))
    launch = time.perf_counter() - t
    client.exec("true")
    return launch, time.perf_counter() - t


def cli(runs: int, network: bool) -> None:
    opts = ["--allow-host", "api.example.test"] if network else []
    name = f"bench{os.getpid()}"
    pool = subprocess.Popen([MATCHLOCK, "pool", name, "--", *opts], stdout=subprocess.PIPE,
                            text=True)
    assert pool.stdout is not None
    load_before = load()
    cold: list[float] = []
    warm: list[float] = []

    def run_d(*args: str) -> float:
        t = time.perf_counter()
        sid = subprocess.run([MATCHLOCK, "run", "-d", *args], check=True, capture_output=True,
                             text=True).stdout.strip()
        took = time.perf_counter() - t
        subprocess.run([MATCHLOCK, "kill", sid], check=True, capture_output=True)
        subprocess.run([MATCHLOCK, "rm", sid], check=True, capture_output=True)
        return took

    try:
        for _ in range(runs):
            line = pool.stdout.readline()  # a member is ready (the previous one's replacement)
            if not line.startswith("ready "):
                raise SystemExit(f"the pool did not fill: {line!r}")
            cold.append(run_d(*opts))
            warm.append(run_d("--pool", name))
    finally:
        pool.send_signal(signal.SIGTERM)
        pool.wait()
    print(json.dumps({
        "accel": "see the SDK run", "network": network, "runs": runs,
        "cli_run_d_cold_p50_ms": statistics.median(cold) * 1000,
        "cli_run_d_pool_p50_ms": statistics.median(warm) * 1000,
        "ratio": round(statistics.median(cold) / statistics.median(warm), 1),
        "load_before": load_before, "load_after": load(),
    }, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--network", action="store_true")
    ap.add_argument("--cli", action="store_true")
    args = ap.parse_args()
    if args.cli:
        cli(args.runs, args.network)
        return
    load_before = load()
    cold: list[tuple[float, float]] = []
    warm: list[tuple[float, float]] = []
    accel = "unknown"
    with Pool(box(args.network), size=1, config=CONFIG) as pool:
        if not pool.wait_ready(timeout=600):
            raise SystemExit(f"the pool did not fill: {pool.last_error}")
        member = pool.member_ids()[0]
        paused_cpu = idle_cpu(member)
        accel = accel_of_running()
        for i in range(args.runs):
            # The replacement of the last hand-out has started: not during a cold boot.
            if not pool.wait_ready(timeout=600):
                raise SystemExit(f"the pool did not refill: {pool.last_error}")
            c = Client(CONFIG)
            cold.append(one(c, args.network))
            if i == 0:
                running_cpu = idle_cpu(str(c.vm_id))
            c.close()
            c.remove()
            if not pool.wait_ready(timeout=600):
                raise SystemExit(f"the pool did not refill: {pool.last_error}")
            c = Client(CONFIG, pool=pool)
            warm.append(one(c, args.network))
            assert c.vm_id is not None and c.vm_id.startswith("vm-")
            c.close()
            c.remove()
    out: dict[str, Any] = {
        "accel": accel, "network": args.network, "runs": args.runs,
        "cold_launch_p50_ms": statistics.median(x[0] for x in cold) * 1000,
        "pool_launch_p50_ms": statistics.median(x[0] for x in warm) * 1000,
        "cold_launch_exec_p50_ms": statistics.median(x[1] for x in cold) * 1000,
        "pool_launch_exec_p50_ms": statistics.median(x[1] for x in warm) * 1000,
        "pool_launch_max_ms": max(x[0] for x in warm) * 1000,
        "idle_vmm_cpu_paused": round(paused_cpu, 4),
        "idle_vmm_cpu_running": round(running_cpu, 4),
        "load_before": load_before, "load_after": load(),
    }
    out["launch_ratio_cold_over_pool"] = round(out["cold_launch_p50_ms"]
                                               / out["pool_launch_p50_ms"], 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
