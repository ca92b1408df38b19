"""`matchlock gc`: reclaim what sandboxes whose owner died left behind."""

from __future__ import annotations

import click


@click.command()
def gc() -> None:
    """Kill orphaned VMs, remove crashed sandboxes and stray directories, release VMM user
    ids, and forget records of sandboxes removed long ago. Stopped sandboxes stay for `rm`."""
    from matchlock.state import registry
    from matchlock.vm import confine

    collected = registry.gc()
    if confine.enabled():
        confine.remove_stale_ids()  # the VMM user ids of dead owners
    for c in collected:
        extra = " (killed its VM)" if c.killed_vmm else ""
        click.echo(f"removed {c.id}{extra}")
    if not collected:
        click.echo("nothing to collect")
