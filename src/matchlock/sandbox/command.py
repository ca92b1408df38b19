"""What a sandboxed command runs with: its argv and environment, composed from the image's
config and the caller's choices (Docker's rules). Shared by every front end (`run`, later
`exec` and the supervisor)."""

from __future__ import annotations

import os
from collections.abc import Container, Iterable
from pathlib import Path

from matchlock.errors import MatchlockError
from matchlock.image.config import ImageConfig
from matchlock.sandbox.envspec import parse_env_entry

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def hide_from_children(names: Iterable[str]) -> None:
    """Drop host environment variables that hold secret values (`--secret NAME@host`) from
    this process's environment, which every child inherits: QEMU, the process a guest
    escape would land in, must not find the values in its own environment. The secrets were
    read already; -e/--env-file of these names are moot (the placeholder wins)."""
    for name in names:
        os.environ.pop(name, None)


def read_env_file(path: str, skip: Container[str] = ()) -> list[tuple[str, str]]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise MatchlockError(f"cannot read env file {path}: {e.strerror}") from None
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#") or line.partition("=")[0] in skip:
            continue
        out.append(parse_env_entry(line, f"{path}:{n}"))
    return out


def compose_env(
    image_env: tuple[str, ...], files: tuple[str, ...], flags: tuple[str, ...], hostname: str,
    tty: bool, network: dict[str, str] | None = None,
) -> list[str]:
    """Image ENV, env files in order, -e, then the network's (CA paths, secret placeholders);
    later wins, order of first appearance kept. A secret's placeholder always wins: a -e of the
    same name must not put a real value where the user asked for a placeholder (so such
    entries are not even looked up: `hide_from_children` removed them from the host's)."""
    network = network or {}
    env: dict[str, str] = {}
    for entry in image_env:
        name, sep, value = entry.partition("=")
        if name and sep:
            env[name] = value
    for path in files:
        env.update(read_env_file(path, network))
    for entry in flags:
        if entry.partition("=")[0] in network:
            continue
        name, value = parse_env_entry(entry, "-e")
        env[name] = value
    env.update(network)
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOSTNAME", hostname)
    if tty:
        env.setdefault("TERM", os.environ.get("TERM", "xterm"))
    return [f"{k}={v}" for k, v in env.items()]


def compose_argv(
    config: ImageConfig, args: tuple[str, ...], entrypoint: str | None
) -> list[str]:
    """Docker's rules: --entrypoint replaces ENTRYPOINT and drops the image's CMD."""
    if entrypoint is not None:
        ep: tuple[str, ...] = (entrypoint,) if entrypoint else ()
        cmd = args
    else:
        ep = config.entrypoint
        cmd = args or config.cmd
    argv = [*ep, *cmd]
    if not argv:
        raise MatchlockError("no command given and the image defines none",
                             hint="add a command after the flags: matchlock run -- CMD")
    return argv
