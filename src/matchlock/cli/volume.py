"""`matchlock volume create|ls|rm|cp`: named ext4 volumes (sandbox/volumes.py).

`create --json` and `ls --json` print what the Python SDK parses: `{"name","size","path"}`.
"""

from __future__ import annotations

import json

import click

_ALIASES = {"list": "ls", "remove": "rm", "copy": "cp"}


class _AliasGroup(click.Group):
    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, _ALIASES.get(cmd_name, cmd_name))


@click.group(cls=_AliasGroup)
def volume() -> None:
    """Manage named volumes: ext4 disks that outlive sandboxes (run --disk @NAME:/path)."""


@volume.command()
@click.argument("name")
@click.option("--size", "size_mb", type=int, default=None, metavar="MB",
              help="Size in MB (default 10240).")
@click.option("--json", "as_json", is_flag=True, help="Print the volume as one JSON object.")
def create(name: str, size_mb: int | None, as_json: bool) -> None:
    """Create volume NAME (an empty ext4 file system, sparse on the host)."""
    from matchlock.sandbox import volumes

    v = volumes.create(name, volumes.DEFAULT_SIZE_MB if size_mb is None else size_mb)
    if as_json:
        click.echo(json.dumps(v.as_json(), separators=(",", ":")))
    else:
        click.echo(f"Created volume {v.name} ({v.size_bytes >> 20} MB)")


@volume.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON array, sorted by name.")
def ls(as_json: bool) -> None:
    """List volumes (SIZE is the file's apparent size)."""
    from matchlock.sandbox import volumes

    vols = volumes.list_volumes()
    if as_json:
        click.echo(json.dumps([v.as_json() for v in vols], separators=(",", ":")))
        return
    width = max([4, *(len(v.name) for v in vols)])
    click.echo(f"{'NAME':<{width}}  SIZE")
    for v in vols:
        click.echo(f"{v.name:<{width}}  {v.size}")


@volume.command()
@click.argument("name")
def rm(name: str) -> None:
    """Delete volume NAME (refused while a sandbox uses it)."""
    from matchlock.sandbox import volumes

    volumes.remove(name)
    click.echo(f"Removed volume {name.strip()}")


@volume.command()
@click.argument("src")
@click.argument("dest")
def cp(src: str, dest: str) -> None:
    """Copy volume SRC to a new volume DEST (refused while a sandbox writes SRC)."""
    from matchlock.sandbox import volumes

    volumes.copy(src, dest)
    click.echo(f"Copied volume {src.strip()} to {dest.strip()}")
