"""The configuration a sandbox is recorded with (`matchlock inspect`): what it was started
with, minus every value that could be secret.

Kept: image, resources, hostname, mounts, disks (volumes), network policy (hosts,
private-host exceptions, pinned addresses, upstream resolvers), secret *names and hosts*, the
command's argv, timeout, and the *names* of the environment variables given with
-e/--env-file. Dropped: secret values
(`--secret NAME=VALUE@…` is cut at the `=`; `--secret-file` keeps its path, which is not the
value), environment values (`-e TOKEN=…` is common), and the CA file's contents.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matchlock.sandbox.core import SandboxOptions


def secret_entry(spec: str, from_file: bool = False) -> dict[str, Any]:
    """`NAME[=VALUE]@HOST[,HOST]` (or `NAME=PATH@HOSTS`) → name and hosts, never the value."""
    left, _, hosts = spec.rpartition("@")
    name, _, rest = left.partition("=")
    entry: dict[str, Any] = {"name": name,
                             "hosts": [h.strip() for h in hosts.split(",") if h.strip()]}
    if from_file:
        entry["file"] = rest
    return entry


def env_names(entries: tuple[str, ...] | list[str]) -> list[str]:
    return [e.partition("=")[0] for e in entries]


def sandbox_config(opts: SandboxOptions, run: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "image": opts.image,
        "cpus": opts.cpus,
        "memory_mb": opts.memory_mb,
        "disk_size_mb": opts.disk_size_mb,
        "hostname": opts.hostname,
        "mounts": [{"host": str(m.host), "guest": m.guest, "mode": m.mode}
                   for m in opts.mounts],
        "extra_hosts": list(opts.extra_hosts),
        "disks": [{"path": str(d.path), "guest": d.guest, "readonly": d.readonly,
                   "volume": d.volume} for d in opts.disks],
    }
    egress = opts.egress
    if egress is None:
        cfg["network"] = None
    else:
        n = egress.opts
        cfg["network"] = {
            "allow_hosts": list(n.allow_hosts),
            "allow_private": list(n.allow_private),
            "add_hosts": list(n.add_hosts),
            "secrets": [secret_entry(s) for s in n.secrets]
            + [secret_entry(s, from_file=True) for s in n.secret_files],
            "upstream_ca": n.upstream_ca,
            "upstream_dns": list(n.upstream_dns),
            "max_connections": n.max_connections or None,
        }
    cfg.update(run)
    return cfg
