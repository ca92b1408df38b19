"""Registry settings: which registries may use plain HTTP, CAs, the config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from matchlock.errors import ImageError
from matchlock.image.registry_config import (
    RegistrySettings,
    config_path,
    is_loopback,
    load_settings,
    split_host_port,
)


@pytest.mark.parametrize("registry, expected", [
    ("127.0.0.1:5000", True), ("127.1.2.3", True), ("localhost:5000", True),
    ("[::1]:5000", True), ("LOCALHOST", True),
    ("10.0.0.1:5000", False), ("reg.test", False), ("[fe80::1]:5000", False),
    ("localhost.evil.test", False), ("127.0.0.1.evil.test", False),
])
def test_loopback(registry: str, expected: bool) -> None:
    assert is_loopback(registry) is expected


def test_split_host_port() -> None:
    assert split_host_port("reg.test:5000") == ("reg.test", 5000)
    assert split_host_port("reg.test") == ("reg.test", None)
    assert split_host_port("[::1]:5000") == ("::1", 5000)
    assert split_host_port("[::1]") == ("::1", None)


def test_insecure_matching() -> None:
    settings = RegistrySettings(insecure=("a.test:5000", "b.test", "10.1.0.0/16"))
    assert settings.is_insecure("a.test:5000") and not settings.is_insecure("a.test:5001")
    assert settings.is_insecure("b.test") and settings.is_insecure("b.test:443")
    assert settings.is_insecure("10.1.2.3:5000") and not settings.is_insecure("10.2.0.1")
    assert not settings.is_insecure("c.test")
    assert settings.allows_http("127.0.0.1:5000") and not settings.allows_http("c.test")
    assert not settings.is_insecure("127.0.0.1:5000")  # loopback: HTTP yes, bad certs no


def test_config_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MATCHLOCK_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert config_path() == tmp_path / "matchlock" / "config.toml"
    monkeypatch.setenv("MATCHLOCK_CONFIG", str(tmp_path / "x.toml"))
    assert config_path() == tmp_path / "x.toml"


def test_load_settings_merges_file_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[registry]\ninsecure = ["a.test"]\nca_certs = ["~/ca.pem"]\n'
                    "max_concurrent_downloads = 99\ntimeout = 2.5\n")
    settings = load_settings(insecure=["b.test"], ca_certs=["/x/ca.pem"], path=path)
    assert settings.insecure == ("a.test", "b.test")
    assert settings.ca_certs == (Path("~/ca.pem").expanduser(), Path("/x/ca.pem"))
    assert settings.jobs == 16 and settings.timeout_s == 2.5


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    assert load_settings(path=tmp_path / "none.toml") == RegistrySettings()


@pytest.mark.parametrize("text, needle", [
    ("not toml [", "invalid config file"),
    ("registry = 1", "[registry] must be a table"),
    ("[registry]\ninsecure = 'a'", "registry.insecure must be a list of strings"),
    ("[registry]\ntimeout = 0", "registry.timeout must be a positive number"),
    ("[registry]\nmax_concurrent_downloads = true", "must be a positive number"),
])
def test_bad_config_file(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ImageError, match=needle.replace("[", r"\[")):
        load_settings(path=path)
