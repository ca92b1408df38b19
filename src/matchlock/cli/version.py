"""`matchlock version`: what is installed, without touching the VM machinery (fast)."""

from __future__ import annotations

import platform

import click

from matchlock import __version__


@click.command()
def version() -> None:
    """Print matchlock's version."""
    click.echo(f"matchlock {__version__} (python {platform.python_version()})")
