#!/usr/bin/env python3
"""Image pull: matchlock versus `skopeo copy` + `umoci unpack`, from a registry on loopback.

    pull.py [--runs N] [--layout DIR] [--json FILE]

Starts Debian's docker-registry on 127.0.0.1 (plain HTTP, storage in a temp dir), pushes the
python:3.12-alpine OCI layout to it with skopeo, then measures, alternating the tools:

1. Cold: nothing cached. matchlock: `matchlock pull IMAGE` (resolve, download, verify, apply
   the layers, pack the ext4 root filesystem). The pair: `skopeo copy docker://IMAGE oci:DIR`
   then `umoci unpack` into a bundle directory (it stops at a directory tree; matchlock
   also packs the tree into ext4, which is what the VM boots).
2. Warm re-resolve: the blobs are cached. `matchlock pull --force` (asks the registry for
   the manifest; layers and root filesystem are reused) versus `skopeo copy` into the same
   layout (skips the blobs it has) + a fresh `umoci unpack`.
3. Warm start: what `matchlock run --image IMAGE` spends on the image when it is cached:
   `resolve_image()` in-process (store lookup, rootfs check, config), and in a fresh
   `run`-like process the image modules' imports plus the first call (the modules `run`
   loads for the VM anyway are imported before the clock starts). No registry is contacted.

Both tools run as CLI processes, so each cold/warm figure includes interpreter or binary
start-up. Dirty data is written back (sync) before each timed step and nothing is deleted
until the end. Reports medians (and min/max) of N runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MATCHLOCK = str(Path(sys.executable).with_name("matchlock"))
DEFAULT_LAYOUT = Path.home() / ".cache/matchlock-testdata/python-3.12-alpine"
LAYOUT_REF = "python-basic"
# What `run` adds for the image, in a fresh process: everything `run` imports for the VM
# anyway is loaded first, then the image modules are imported and the name resolved.
WARM_SNIPPET = """
import sys, time
import matchlock.cli.run, matchlock.guest.protocol, matchlock.sandbox.boot, matchlock.sandbox.core
t0 = time.perf_counter()
from matchlock.image.resolve import resolve_image
resolve_image(sys.argv[1])
elapsed = time.perf_counter() - t0
assert "httpx" not in sys.modules, "the cached path must not load the registry client"
print(elapsed)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_registry(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = work / "registry.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {work / 'storage'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: bench\n"
    )
    proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("docker-registry did not start")


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    # Write back what the previous step left dirty, so no step pays for another's I/O.
    os.sync()
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def summary(values: list[float], scale: float = 1.0, unit: str = "s") -> str:
    digits = 3 if unit == "s" else 1
    med = statistics.median(values) * scale
    return (f"{med:.{digits}f} {unit} ({min(values) * scale:.{digits}f} to "
            f"{max(values) * scale:.{digits}f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--layout", type=Path, default=DEFAULT_LAYOUT)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    for tool in ("docker-registry", "skopeo", "umoci"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (scripts/bootstrap.sh installs it)")
    if not (args.layout / "index.json").is_file():
        raise SystemExit(f"{args.layout} missing (run scripts/testdata.sh)")

    work = Path(tempfile.mkdtemp(prefix="matchlock-bench-pull-"))
    registry, address = start_registry(work)
    image = f"{address}/python:3.12-alpine"
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["MATCHLOCK_CONFIG"] = str(work / "none.toml")
    results: dict[str, list[float]] = {k: [] for k in (
        "ml_cold", "pair_cold", "ml_warm", "pair_warm", "resolve_inproc", "resolve_fresh")}
    try:
        subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false",
                        f"oci:{args.layout}:{LAYOUT_REF}", f"docker://{image}"], check=True)
        for i in range(args.runs):
            cache = work / f"cache-{i}"
            ml_env = {**env, "MATCHLOCK_CACHE_DIR": str(cache)}
            results["ml_cold"].append(timed([MATCHLOCK, "pull", "-q", image], ml_env))
            results["ml_warm"].append(timed([MATCHLOCK, "pull", "-q", "--force", image],
                                            ml_env))
            oci = work / f"oci-{i}"
            oci.mkdir()
            copy = ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{image}",
                    f"oci:{oci}:py"]
            results["pair_cold"].append(
                timed(copy) + timed(["umoci", "unpack", "--image", f"{oci}:py",
                                     str(work / f"bundle-{i}")]))
            results["pair_warm"].append(
                timed(copy) + timed(["umoci", "unpack", "--image", f"{oci}:py",
                                     str(work / f"bundle-{i}-again")]))
            # Nothing is deleted until the end: on a file system mounted with `discard`,
            # deleting hundreds of MB slows down whatever is measured next.

        # Warm start: the last cache still holds the image.
        warm_env = {**env, "MATCHLOCK_CACHE_DIR": str(work / f"cache-{args.runs - 1}")}
        for _ in range(max(args.runs, 10)):
            out = subprocess.run([sys.executable, "-c", WARM_SNIPPET, image], check=True,
                                 capture_output=True, text=True, env=warm_env).stdout
            results["resolve_fresh"].append(float(out))
        os.environ.update(warm_env)
        from matchlock.image.resolve import resolve_image

        resolve_image(image)
        for _ in range(100):
            start = time.perf_counter()
            resolve_image(image)
            results["resolve_inproc"].append(time.perf_counter() - start)
    finally:
        registry.terminate()
        registry.wait()
        shutil.rmtree(work, ignore_errors=True)

    ms = 1000.0
    # Run i of each tool ran back to back, so the ratio cancels most of the machine's drift.
    ratios = [a / b for a, b in zip(results["ml_cold"], results["pair_cold"], strict=True)]
    wins = sum(r < 1 for r in ratios)
    rows = [
        ("cold: pull + unpack (nothing cached)", summary(results["ml_cold"]),
         summary(results["pair_cold"])),
        ("warm: re-resolve, blobs cached", summary(results["ml_warm"]),
         summary(results["pair_warm"])),
        ("cold, paired per run: matchlock time / pair time",
         f"median {statistics.median(ratios):.2f}, faster in {wins} of {len(ratios)} runs",
         ""),
        ("warm start: image resolution in `run`, in-process",
         summary(results["resolve_inproc"], ms, "ms"), "n/a"),
        ("warm start: same, first call in a fresh `run` process incl. imports",
         summary(results["resolve_fresh"], ms, "ms"), "n/a"),
    ]
    print(f"python:3.12-alpine (5 layers, 18.6 MB) from docker-registry on loopback, "
          f"{args.runs} runs, median (min to max)\n")
    print("| | matchlock | skopeo copy + umoci unpack |")
    print("|---|---|---|")
    for label, ours, theirs in rows:
        print(f"| {label} | {ours} | {theirs} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
