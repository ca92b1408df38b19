"""End to end: images pulled from a local registry boot in real microVMs."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from matchlock.paths import cache_dir
from tests.integration.conftest import leftovers
from tests.integration.registry.conftest import CliRun
from tests.integration.registry.servers import FaultProxy, RegistryServer

pytestmark = pytest.mark.vm


@pytest.fixture
def vm_cli(cli: CliRun, state_dir: Path, tmp_path: Path) -> Iterator[CliRun]:
    """The CLI with a private image store but the shared kernel, agent and disk templates."""
    real = cache_dir()
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    for entry in real.iterdir():
        if entry.name != "images":
            (cache / entry.name).symlink_to(entry)

    def run(*args: str, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return cli(*args, env={"MATCHLOCK_STATE_DIR": str(state_dir), **(env or {})},
                   timeout=timeout)

    yield run
    assert leftovers(state_dir) == []


def test_pulled_python_image_runs(vm_cli: CliRun, python_pushed: str) -> None:
    r = vm_cli("pull", python_pushed)
    assert r.returncode == 0, r.stderr
    r = vm_cli("run", "--image", python_pushed, "--", "python3", "-c",
               "import ssl, sqlite3; print(1)")
    assert (r.returncode, r.stdout) == (0, "1\n"), (r.stderr, r.stdout)


def test_run_pulls_once_then_needs_no_registry(vm_cli: CliRun,
                                               plain_registry: RegistryServer) -> None:
    proxy = FaultProxy(plain_registry.port)
    name = f"{proxy.address}/busybox"
    try:
        r = vm_cli("run", "--image", name, "--", "echo", "first")
        assert (r.returncode, r.stdout) == (0, "first\n"), r.stderr
        assert f"pulling {name}" in r.stderr
    finally:
        proxy.stop()
    r = vm_cli("run", "--image", name, "--", "echo", "cached")
    assert (r.returncode, r.stdout) == (0, "cached\n"), r.stderr
    assert "pulling" not in r.stderr
    r = vm_cli("run", "--pull", "--image", name, "--", "echo", "never")
    assert r.returncode == 1 and "cannot reach registry" in r.stderr and r.stdout == ""
