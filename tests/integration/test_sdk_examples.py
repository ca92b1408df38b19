"""examples/code_interpreter.py, run as a user runs it, against real VMs: upload a CSV, run a
Python program on it in python:3.12-alpine, download the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import MATCHLOCK
from .rpc_util import wait_no_leftovers

pytestmark = pytest.mark.vm
Run = Callable[..., subprocess.CompletedProcess[bytes]]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example(name: str, *args: str, env: dict[str, str] | None = None, cwd: Path,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "MATCHLOCK_BIN": MATCHLOCK, **(env or {})}
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True,
                          text=True, env=full, cwd=cwd, timeout=timeout)


def test_code_interpreter(python_image: str, tmp_path: Path, ml: Run, state_dir: Path) -> None:
    data = tmp_path / "temps.csv"
    rows = ["city,temp"] + [f"{c},{t}" for c, t in
                            [("Oslo", 3.5), ("Rome", 18), ("Oslo", 4.5), ("Rome", 21),
                             ("Lima", 19.25)]]
    data.write_text("\n".join(rows) + "\n")
    result = tmp_path / "out" / "result.json"
    result.parent.mkdir()
    r = example("code_interpreter.py", str(data), str(result), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(result.read_text()) == {
        "Lima": {"max": 19.25, "mean": 19.25, "n": 1},
        "Oslo": {"max": 4.5, "mean": 4.0, "n": 2},
        "Rome": {"max": 21.0, "mean": 19.5, "n": 2},
    }
    lines = r.stdout.splitlines()
    assert lines[0] == "read 5 rows, 3 cities (Python 3.12.11)", r.stdout
    assert lines[1].startswith(f"result: {result} (")
    assert wait_no_leftovers(state_dir) == []


def test_code_interpreter_failing_program(python_image: str, tmp_path: Path, ml: Run,
                                          state_dir: Path) -> None:
    """A data file the program cannot parse: its traceback on stderr, its exit code passed
    through, no result written, nothing left behind."""
    data = tmp_path / "bad.csv"
    data.write_text("city,temp\nOslo,cold\n")
    result = tmp_path / "result.json"
    r = example("code_interpreter.py", str(data), str(result), cwd=tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "ValueError: could not convert string to float: 'cold'" in r.stderr
    assert not result.exists()
    assert wait_no_leftovers(state_dir) == []


def test_the_docs_snippets_run(python_image: str, tmp_path: Path, ml: Run,
                               state_dir: Path) -> None:
    """The snippets in docs/sdk.md (the quick starts and the warm pool), run as written."""
    doc = (EXAMPLES.parent / "docs" / "sdk.md").read_text()
    blocks = [b.split("```", 1)[0] for b in doc.split("```python\n")[1:]]
    assert len(blocks) == 3
    outputs = []
    for i, code in enumerate(blocks):
        script = tmp_path / f"snippet{i}.py"
        script.write_text(code)
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                           cwd=tmp_path, timeout=300,
                           env={**os.environ, "MATCHLOCK_BIN": MATCHLOCK})
        assert r.returncode == 0, r.stderr
        outputs.append(r.stdout)
    assert outputs[0] == "0 42\n\nb'data'\n"
    assert outputs[1] == "a\n b\n\n"
    assert outputs[2] == "one\ntwo\n"  # the warm pool's snippet
    assert wait_no_leftovers(state_dir) == []
