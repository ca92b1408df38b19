"""`matchlock image`: import, list and remove local images, and reclaim their space."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from matchlock.errors import ImageError

_MB = 1_000_000


def _mb(size: int) -> str:
    return f"{size / _MB:.1f} MB"


@click.group()
def image() -> None:
    """Manage local images."""


@image.command("import")
@click.argument("tag")
@click.argument("source", required=False)
def import_(tag: str, source: str | None) -> None:
    """Import an image as TAG from a file, a directory or stdin.

    SOURCE is a `docker save` tar, an OCI image layout directory, or such a layout packed
    as a tar. Without SOURCE (or with -), a tar is read from standard input.
    """
    from matchlock.image.importer import import_image
    from matchlock.image.reference import parse_reference
    from matchlock.image.store import ImageStore

    parse_reference(tag)  # a bad name fails before anything is read
    store = ImageStore()
    if source is None or source == "-":
        stdin = sys.stdin.buffer
        if stdin.isatty():
            raise ImageError(
                "no image to import: standard input is a terminal",
                hint=f"pass a file, e.g. `matchlock image import {tag} image.tar`, or pipe "
                f"one in: `docker save IMAGE | matchlock image import {tag}`",
            )
        click.echo(f"Importing {tag} from stdin...", err=True)
        stored = import_image(store, tag, stdin)
    else:
        click.echo(f"Importing {tag} from {source}...", err=True)
        stored = import_image(store, tag, Path(source))
    click.echo(f"Imported: {stored.name}")
    click.echo(f"Digest: {stored.manifest_digest}")
    click.echo(f"Layers: {len(stored.layers)}")
    click.echo(f"Size: {_mb(stored.size)}")


def _list() -> None:
    from matchlock.image.store import ImageStore

    rows = [("NAME", "DIGEST", "SIZE", "CREATED")]
    for stored in ImageStore().list():
        created = stored.created.astimezone().strftime("%Y-%m-%d %H:%M:%S")
        short = stored.manifest_digest.split(":", 1)[1][:12]
        rows.append((stored.name, short, _mb(stored.size), created))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for name, digest, size, created in rows:
        click.echo(f"{name:<{widths[0]}}  {digest:<{widths[1]}}  {size:>{widths[2]}}  {created}")


@image.command("ls")
def ls() -> None:
    """List local images."""
    _list()


@image.command("list", hidden=True)
def list_() -> None:
    """List local images."""
    _list()


def _remove(tag: str) -> None:
    from matchlock.image.store import ImageStore

    if not ImageStore().remove(tag):
        raise ImageError(f"no image named {tag!r}", hint="see `matchlock image ls`")
    click.echo(f"Removed {tag} (run `matchlock image gc` to free its space)")


@image.command("rm")
@click.argument("tag")
def rm(tag: str) -> None:
    """Remove the image named TAG (its data is freed by `image gc`)."""
    _remove(tag)


@image.command("remove", hidden=True)
@click.argument("tag")
def remove(tag: str) -> None:
    """Remove the image named TAG (its data is freed by `image gc`)."""
    _remove(tag)


@image.command("gc")
def gc() -> None:
    """Delete data no image refers to (blobs, root filesystems, leftovers)."""
    from matchlock.image.store import ImageStore

    freed = ImageStore().gc()
    click.echo(f"Freed {_mb(freed)}")
