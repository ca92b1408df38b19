"""Small CLI behaviours a new user meets first."""

from __future__ import annotations

from matchlock import __version__


def test_version_command(ml) -> None:  # type: ignore[no-untyped-def]
    r = ml("version", check=True)
    assert r.stdout.decode().startswith(f"matchlock {__version__} (python ")
    assert ml("--version", check=True).stdout.decode().strip().endswith(__version__)


def test_dotted_hostname_like_docker(ml) -> None:  # type: ignore[no-untyped-def]
    r = ml("run", "--no-network", "--hostname", "override.internal", "--", "sh", "-c",
           "hostname; cat /etc/hostname", check=True)
    assert r.stdout.decode().split() == ["override.internal", "override.internal"]
    bad = ml("run", "--hostname", "bad..name", "--", "true")
    assert bad.returncode == 1
    assert bad.stderr.decode().count("\n") == 1 and "invalid hostname" in bad.stderr.decode()
