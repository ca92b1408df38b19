"""`matchlock ls`, `kill` and `rm`: the sandboxes in the state directory."""

from __future__ import annotations

import json
import os
import signal
import time

import click

from matchlock.errors import MatchlockError

STOP_WAIT_S = 60.0


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
@click.option("--running", is_flag=True, help="Only running sandboxes.")
def ls(as_json: bool, running: bool = False) -> None:
    """List sandboxes, newest first: running, stopped or crashed (its owner died)."""
    from matchlock.state import registry

    entries = [e for e in reversed(registry.entries()) if not running or e.status == "running"]
    if as_json:
        click.echo(json.dumps([{"id": e.owner.id, "image": e.owner.image, "status": e.status,
                                "created": e.owner.created, "pid": e.owner.pid}
                               for e in entries]))
        return
    click.echo(f"{'ID':<12} {'STATUS':<8} {'IMAGE':<32} {'CREATED':<20} PID")
    for e in entries:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.owner.created))
        click.echo(f"{e.owner.id:<12} {e.status:<8} {e.owner.image:<32} {created:<20} "
                   f"{e.owner.pid}")


def _stop(sid: str) -> None:
    """Stop a running sandbox: ask its supervisor, or signal a `run`'s owner; wait for it."""
    from matchlock.sandbox.control import connect, request
    from matchlock.state import registry

    entry = registry.lookup(sid)
    if entry.status != "running":
        raise MatchlockError(f"sandbox {sid} is not running ({entry.status})")
    owner = entry.owner
    if (entry.path / registry.SOCKET).exists():
        try:
            request(connect(sid), {"op": "shutdown"})
        except (MatchlockError, OSError):
            os.kill(owner.pid, signal.SIGTERM)
    else:
        os.kill(owner.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_S
    while registry.alive(owner.pid, owner.pid_start):
        if time.monotonic() > deadline:
            os.kill(owner.pid, signal.SIGKILL)  # the VMM dies with it; gc removes the rest
            break
        time.sleep(0.02)


@click.command()
@click.option("--all", "all_", is_flag=True, help="Every running sandbox.")
@click.argument("sandbox_id", required=False)
def kill(all_: bool, sandbox_id: str | None) -> None:
    """Stop a running sandbox (its files stay until `matchlock rm`)."""
    from matchlock.state import registry

    if all_ == (sandbox_id is not None):
        raise MatchlockError("give a sandbox id or --all (not both)")
    ids = ([e.owner.id for e in registry.entries() if e.status == "running"] if all_
           else [str(sandbox_id)])
    for sid in ids:
        _stop(sid)
        click.echo(f"Killed {sid}")


@click.command()
@click.option("-f", "--force", is_flag=True, help="Kill it first if it is running.")
@click.option("--stopped", is_flag=True, help="Every stopped or crashed sandbox.")
@click.argument("sandbox_ids", nargs=-1)
def rm(force: bool, sandbox_ids: tuple[str, ...], stopped: bool = False) -> None:
    """Remove stopped or crashed sandboxes (a running one needs `kill` first, or -f)."""
    from matchlock.state import registry
    from matchlock.vm import confine

    if stopped == bool(sandbox_ids):
        raise MatchlockError("give sandbox ids or --stopped (not both)")
    if stopped:
        sandbox_ids = tuple(e.owner.id for e in registry.entries() if e.status != "running")
    for sid in sandbox_ids:
        entry = registry.lookup(sid)
        if entry.status == "running":
            if not force:
                raise MatchlockError(f"sandbox {sid} is running",
                                     hint=f"`matchlock kill {sid}` first, or rm -f")
            _stop(sid)
            try:
                entry = registry.lookup(sid)
            except MatchlockError:
                # Its owner removed it on the way out (an rpc process does).
                click.echo(f"Removed {sid}")
                continue
        registry.collect(entry.path, entry.owner)
        if confine.enabled():
            confine.remove_stale_ids()
        click.echo(f"Removed {sid}")
