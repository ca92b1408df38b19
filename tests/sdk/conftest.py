"""The official SDK (matchlock 0.2.17, same package name as this project) in a virtualenv of
its own, so that it never imports this project's package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

OFFICIAL_VERSION = "0.2.17"


@pytest.fixture(scope="session")
def official_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("MATCHLOCK_OFFICIAL_SDK_PYTHON")
    if given:
        return Path(given)
    venv = tmp_path_factory.mktemp("official-sdk")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    f"matchlock=={OFFICIAL_VERSION}"], check=True, timeout=300)
    where = subprocess.run([str(py), "-c", "import matchlock, sys; print(matchlock.__file__)"],
                           cwd=venv, capture_output=True, text=True, check=True).stdout
    assert str(venv) in where, f"the official SDK resolved to {where}"
    return py
