"""From the name a user typed to what a sandbox boots: a rootfs artifact plus the config."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from matchlock.errors import ImageError
from matchlock.image.config import ImageConfig


@dataclass(frozen=True)
class ResolvedImage:
    name: str
    rootfs: Path
    config: ImageConfig


def _log(line: str) -> None:
    print(f"matchlock: {line}", file=sys.stderr)


def resolve_image(name: str | None) -> ResolvedImage:
    from matchlock.image.builtin import ensure_builtin
    from matchlock.image.store import ImageStore

    store = ImageStore()
    if name is None:
        stored = ensure_builtin(store)
    else:
        found = store.lookup(name)
        if found is None:
            raise ImageError(
                f"image {name!r} is not in the local store",
                hint=f"import it with `matchlock image import {name} FILE` "
                "(see `matchlock image ls`)",
            )
        stored = found
    return ResolvedImage(stored.name, store.rootfs(stored, _log), store.config(stored))
