"""Latency through the official Python SDK (0.2.17) driving `matchlock rpc`: `launch`
(spawning `matchlock rpc` included) and an `exec("true")` round trip.

    MATCHLOCK_HOME=/tmp/somewhere .venv/bin/python benchmarks/rpc_sdk.py [LAUNCHES] [EXECS]

The SDK runs with its own interpreter: $MATCHLOCK_SDK_VENV or .sdk-venv (scripts/bootstrap.sh).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MATCHLOCK = str(Path(sys.executable).with_name("matchlock"))
REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, statistics, sys, time
from matchlock import Client, Sandbox
launches, execs, closes = [], [], []
for i in range(int(sys.argv[1])):
    t = time.perf_counter()
    c = Client()
    c.start()
    c.launch(Sandbox("matchlock-builtin:busybox"))
    launches.append(time.perf_counter() - t)
    if i == 0:
        c.exec("true")  # warm
        for _ in range(int(sys.argv[2])):
            t = time.perf_counter()
            c.exec("true")
            execs.append(time.perf_counter() - t)
    t = time.perf_counter()
    c.close()
    c.remove()
    closes.append(time.perf_counter() - t)
print(json.dumps({"launch_p50_s": statistics.median(launches),
                  "exec_true_p50_ms": statistics.median(execs) * 1000,
                  "close_remove_p50_s": statistics.median(closes),
                  "launches": len(launches), "execs": len(execs)}))
"""


def main() -> None:
    launches = sys.argv[1] if len(sys.argv) > 1 else "10"
    execs = sys.argv[2] if len(sys.argv) > 2 else "100"
    venv = Path(os.environ.get("MATCHLOCK_SDK_VENV") or REPO / ".sdk-venv")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MATCHLOCK_BIN"] = MATCHLOCK
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run([str(venv / "bin" / "python"), "-c", SCRIPT, launches, execs],
                             check=True, capture_output=True, text=True, cwd=cwd, env=env)
    print(json.dumps(json.loads(out.stdout), indent=2))


if __name__ == "__main__":
    main()
