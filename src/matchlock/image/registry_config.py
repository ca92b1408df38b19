"""Registry connection settings: the config file plus command-line overrides.

The config file is TOML, `$MATCHLOCK_CONFIG` or `$XDG_CONFIG_HOME/matchlock/config.toml`
(default `~/.config/matchlock/config.toml`); every key is optional:

    [registry]
    insecure = ["registry.lan:5000", "10.0.0.0/8"]   # plain HTTP / unverified TLS allowed
    ca_certs = ["/etc/matchlock/corp-ca.pem"]        # trusted besides the system roots
    max_concurrent_downloads = 4
    timeout = 30                                     # seconds, per connect/read

Loopback registries (localhost, 127.0.0.0/8, ::1) may always use plain HTTP, as Docker allows.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matchlock.errors import ImageError

DEFAULT_JOBS = 4
DEFAULT_TIMEOUT_S = 30.0
_MAX_JOBS = 16


def config_path() -> Path:
    env = os.environ.get("MATCHLOCK_CONFIG")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg else Path.home() / ".config"
    return base / "matchlock" / "config.toml"


def split_host_port(registry: str) -> tuple[str, int | None]:
    """`host:port`, `[v6]:port`, `host` -> (host without brackets, port or None)."""
    if registry.startswith("["):
        end = registry.find("]")
        host, rest = registry[1:end], registry[end + 1 :]
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    host, sep, port = registry.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, int(port)
    return registry, None


def is_loopback(registry: str) -> bool:
    host, _ = split_host_port(registry)
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _matches(entry: str, registry: str) -> bool:
    """An `insecure` entry: HOST (any port), HOST:PORT, or a CIDR for IP-literal hosts."""
    entry = entry.strip().lower()
    registry = registry.lower()
    if entry == registry:
        return True
    host, _ = split_host_port(registry)
    if "/" in entry:
        try:
            return ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False)
        except ValueError:
            return False
    entry_host, entry_port = split_host_port(entry)
    return entry_port is None and entry_host == host


@dataclass(frozen=True)
class RegistrySettings:
    insecure: tuple[str, ...] = ()
    ca_certs: tuple[Path, ...] = ()
    jobs: int = DEFAULT_JOBS
    timeout_s: float = DEFAULT_TIMEOUT_S
    # Where credentials come from; None = Docker's default ($DOCKER_CONFIG or ~/.docker).
    docker_config: Path | None = field(default=None)

    def is_insecure(self, registry: str) -> bool:
        """Marked insecure by the user: plain HTTP and unverified certificates are allowed."""
        return any(_matches(entry, registry) for entry in self.insecure)

    def allows_http(self, registry: str) -> bool:
        return is_loopback(registry) or self.is_insecure(registry)


def _bad(path: Path, why: str) -> ImageError:
    return ImageError(f"invalid config file {path}: {why}", hint="fix or remove the file")


def _str_list(section: dict[str, Any], key: str, path: Path) -> list[str]:
    value = section.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(path, f"registry.{key} must be a list of strings")
    return value


def _number(section: dict[str, Any], key: str, path: Path, default: float) -> float:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise _bad(path, f"registry.{key} must be a positive number")
    return float(value)


def load_settings(
    *, insecure: Iterable[str] = (), ca_certs: Iterable[str | Path] = (), path: Path | None = None
) -> RegistrySettings:
    """Settings from the config file (if any) extended by command-line values."""
    path = path or config_path()
    section: dict[str, Any] = {}
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        doc = {}
    except OSError as exc:
        raise _bad(path, exc.strerror or str(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise _bad(path, str(exc)) from None
    raw = doc.get("registry", {})
    if not isinstance(raw, dict):
        raise _bad(path, "[registry] must be a table")
    section = raw
    cas = [Path(p).expanduser() for p in _str_list(section, "ca_certs", path)]
    jobs = int(_number(section, "max_concurrent_downloads", path, DEFAULT_JOBS))
    return RegistrySettings(
        insecure=(*_str_list(section, "insecure", path), *insecure),
        ca_certs=(*cas, *(Path(p) for p in ca_certs)),
        jobs=min(jobs, _MAX_JOBS),
        timeout_s=_number(section, "timeout", path, DEFAULT_TIMEOUT_S),
    )
