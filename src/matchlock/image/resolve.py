"""From the name a user typed to what a sandbox boots: a rootfs artifact plus the config.

A name found in the local store is used as is, without contacting any registry (the warm
path of every `run`); a missing one is pulled. `pull=True` (`run --pull`) always asks the
registry what the name points at now; unchanged layers and root filesystems are reused.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from matchlock.errors import ImageError
from matchlock.image.config import ImageConfig

if TYPE_CHECKING:
    from matchlock.image.store import ImageStore, StoredImage


@dataclass(frozen=True)
class ResolvedImage:
    name: str
    rootfs: Path
    config: ImageConfig


def _log(line: str) -> None:
    print(f"matchlock: {line}", file=sys.stderr)


def _usable(store: ImageStore, image: StoredImage) -> bool:
    """Its config is there, and its root filesystem is built or can be (a few stat calls)."""
    if not store.has_blob(image.config_digest):
        return False
    return store.rootfs_path(image).is_file() or all(store.has_blob(d) for d in image.layers)


def _pull(store: ImageStore, name: str, *, missing: bool) -> StoredImage:
    # Imported lazily: the HTTP stack costs tens of milliseconds that a cached run skips.
    from matchlock.image.progress import make_progress
    from matchlock.image.pull import pull_image

    try:
        return pull_image(store, name, progress=make_progress(title=f"pulling {name}"),
                          log=_log)
    except ImageError as exc:
        if not missing:
            raise
        raise ImageError(
            f"image {name!r} is not in the local store and pulling it failed: {exc.message}",
            hint=exc.hint or f"import it with `matchlock image import {name} FILE`",
        ) from None


def resolve_image(name: str | None, *, pull: bool = False) -> ResolvedImage:
    from matchlock.image.builtin import ensure_builtin
    from matchlock.image.store import ImageStore

    store = ImageStore()
    if name is None:
        stored = ensure_builtin(store)
    else:
        found = None if pull else store.lookup(name)
        if found is not None and _usable(store, found):
            stored = found
        else:
            stored = _pull(store, name, missing=found is None and not pull)
    return ResolvedImage(stored.name, store.rootfs(stored, _log), store.config(stored))
