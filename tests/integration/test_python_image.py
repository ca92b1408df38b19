"""The real python:3.12-alpine image: config semantics (ENV, WORKDIR, USER, CMD)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

pytestmark = pytest.mark.vm
Run = Callable[..., subprocess.CompletedProcess[bytes]]


def test_python_runs_with_image_config(ml: Run, python_image: str) -> None:
    r = ml("run", "--image", python_image, "--", "python3", "-c",
           "import os, ssl, sqlite3, getpass; "
           "print(os.getcwd(), getpass.getuser(), os.environ['PYTHON_VERSION'][:4], "
           "os.environ['PATH'].split(':')[0], os.environ['HOME'])")
    assert r.returncode == 0, r.stderr
    cwd, user, version, path0, home = r.stdout.decode().split()
    assert (cwd, user, version, path0) == ("/app", "appuser", "3.12", "/usr/local/bin")
    assert home.startswith("/")


def test_overrides_beat_the_image_config(ml: Run, python_image: str) -> None:
    r = ml("run", "--image", python_image, "-u", "root", "-w", "/tmp",
           "-e", "PYTHON_VERSION=mine", "--", "sh", "-c", 'echo "$(id -u) $(pwd) $PYTHON_VERSION"')
    assert r.stdout.decode().split() == ["0", "/tmp", "mine"], r.stderr


def test_default_cmd_and_entrypoint_override(ml: Run, python_image: str) -> None:
    # The image's CMD is python3: with stdin closed the REPL exits 0 at once.
    r = ml("run", "--image", python_image)
    assert r.returncode == 0, r.stderr
    r = ml("run", "--image", python_image, "--entrypoint", "python3", "--", "-c", "print(6*7)")
    assert r.stdout == b"42\n", r.stderr


def test_python_writes_are_per_sandbox(ml: Run, python_image: str) -> None:
    r = ml("run", "--image", python_image, "-u", "root", "--", "sh", "-c",
           "pip --version >/dev/null && echo x > /usr/local/lib/marker "
           "&& cat /usr/local/lib/marker")
    assert r.stdout == b"x\n", r.stderr
    r = ml("run", "--image", python_image, "--", "ls", "/usr/local/lib/marker")
    assert r.returncode != 0
