"""Where matchlock keeps its cache (rebuildable) and state (per-sandbox).

Defaults: state in `~/.matchlock`, cache in `$XDG_CACHE_HOME/matchlock` (`~/.cache/matchlock`).
`MATCHLOCK_HOME=DIR` moves both: state in DIR, cache in DIR/cache (the tests give every
session a temporary one). `MATCHLOCK_STATE_DIR` and `MATCHLOCK_CACHE_DIR` override either.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Rebuildable artifacts: kernel, agent, initramfs, images, rootfs."""
    env = os.environ.get("MATCHLOCK_CACHE_DIR")
    if env:
        return Path(env)
    home = os.environ.get("MATCHLOCK_HOME")
    if home:
        return Path(home) / "cache"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "matchlock"


def state_dir() -> Path:
    """Per-sandbox directories and the state database."""
    env = os.environ.get("MATCHLOCK_STATE_DIR")
    if env:
        return Path(env)
    home = os.environ.get("MATCHLOCK_HOME")
    if home:
        return Path(home)
    return Path.home() / ".matchlock"


def runtime_dir() -> Path:
    """Host-wide coordination between owners (VMM user ids, the VMM's empty root): root only,
    and on a tmpfs that a reboot empties, when /run is one."""
    env = os.environ.get("MATCHLOCK_RUN_DIR")
    return Path(env) if env else Path("/run/matchlock")
