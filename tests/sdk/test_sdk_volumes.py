"""The official SDK 0.2.17 (and this project's) drive `matchlock volume` through the real CLI:
create, list and remove give the same results under both (no VM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

MATCHLOCK = str(Path(sys.executable).with_name("matchlock"))
SCRIPT = """
import json, sys
from matchlock import Client, Config, MatchlockError
c = Client(Config(binary_path=sys.argv[1]))
out = []
v = c.volume_create(sys.argv[2], 16)
out.append([v.name, v.size, v.path])
out.append([[v.name, v.size, v.path] for v in c.volume_list()])
try:
    c.volume_create(sys.argv[2], 16)
    out.append("created twice")
except Exception as e:
    out.append(type(e).__name__)
c.volume_remove(sys.argv[2])
out.append([v.name for v in c.volume_list()])
print(json.dumps(out))
"""


def _run(python: str, name: str) -> list[object]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([python, "-c", SCRIPT, MATCHLOCK, name], capture_output=True, text=True,
                       timeout=60, env=env, cwd="/")
    assert r.returncode == 0, r.stderr
    result: list[object] = json.loads(r.stdout)
    return result


def test_official_and_own_sdk_volumes(official_python: Path, matchlock_home: Path) -> None:
    theirs = _run(str(official_python), "sdk-vol")
    ours = _run(sys.executable, "sdk-vol")
    path = str(matchlock_home / "volumes" / "sdk-vol.ext4")
    assert theirs == ours == [
        ["sdk-vol", "16.0 MB", path], [["sdk-vol", "16.0 MB", path]], "CalledProcessError",
        []]
