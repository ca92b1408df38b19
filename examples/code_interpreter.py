#!/usr/bin/env python3
"""A code interpreter: upload a data file, run a Python program on it in a sandbox, download
the result.

    python examples/code_interpreter.py DATA.csv RESULT.json

DATA.csv has a header row with the columns `city` and `temp` (a number). The program runs in
`python:3.12-alpine` (override with $MATCHLOCK_EXAMPLE_IMAGE) with no network (the sandbox's
default: no allow-list, nothing leaves), computes per-city statistics and writes them to
/tmp/job/result.json, which is downloaded to RESULT.json. The program's own output is printed as
it runs; its exit code is this script's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from matchlock import Client, Sandbox

IMAGE = os.environ.get("MATCHLOCK_EXAMPLE_IMAGE", "python:3.12-alpine")

# What a model would have written; here fixed, so the example's output can be checked.
PROGRAM = r'''
import csv, json, statistics, sys
by_city = {}
with open("/tmp/job/data.csv", newline="") as f:
    for row in csv.DictReader(f):
        by_city.setdefault(row["city"], []).append(float(row["temp"]))
result = {city: {"n": len(t), "mean": round(statistics.fmean(t), 3), "max": max(t)}
          for city, t in sorted(by_city.items())}
with open("/tmp/job/result.json", "w") as f:
    json.dump(result, f, indent=2, sort_keys=True)
print(f"read {sum(len(t) for t in by_city.values())} rows, {len(by_city)} cities",
      f"(Python {sys.version.split()[0]})")
'''


def main(data: Path, result: Path) -> int:
    with Client() as client:
        client.launch(Sandbox(IMAGE).with_memory(256))
        # Commands run as the image's user; files from write_file are root's (mode 0644):
        # the job's directory is made by that user so the program can write its result there.
        client.exec("mkdir -p /tmp/job")
        client.write_file("/tmp/job/data.csv", data.read_bytes())
        client.write_file("/tmp/job/analyze.py", PROGRAM)
        run = client.exec_stream("python3 analyze.py", stdout=sys.stdout, stderr=sys.stderr,
                                 working_dir="/tmp/job")
        if run.exit_code == 0:
            result.write_bytes(client.read_file("/tmp/job/result.json"))
            print(f"result: {result} ({result.stat().st_size} bytes, program took "
                  f"{run.duration_ms} ms)")
    client.remove()  # the closed sandbox's state (`matchlock rm ID`)
    return run.exit_code


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
