"""Where matchlock keeps its cache (rebuildable) and state (per-sandbox).

Defaults: state in `~/.matchlock`, cache in `$XDG_CACHE_HOME/matchlock` (`~/.cache/matchlock`).
`MATCHLOCK_HOME=DIR` moves both: state in DIR, cache in DIR/cache (the tests give every
session a temporary one). `MATCHLOCK_STATE_DIR` and `MATCHLOCK_CACHE_DIR` override either.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path


def cache_dir() -> Path:
    """Rebuildable artifacts: kernel, agent, initramfs, images, rootfs."""
    from pathlib import Path

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
    from pathlib import Path

    return Path(state_dir_str())


def state_dir_str() -> str:
    """state_dir() as a string, without pathlib (which costs a fresh `matchlock exec` ~3 ms)."""
    env = os.environ.get("MATCHLOCK_STATE_DIR")
    if env:
        return env
    home = os.environ.get("MATCHLOCK_HOME")
    if home:
        return home
    home = os.path.expanduser("~")
    if home.startswith("~"):  # as Path.home() does
        raise RuntimeError("Could not determine home directory.")
    return os.path.join(home, ".matchlock")


def runtime_dir() -> Path:
    """Host-wide coordination between owners (VMM user ids, the VMM's empty root): root only,
    and on a tmpfs that a reboot empties, when /run is one."""
    from pathlib import Path

    env = os.environ.get("MATCHLOCK_RUN_DIR")
    return Path(env) if env else Path("/run/matchlock")
