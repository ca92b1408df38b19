"""`matchlock ls`, `kill`, `rm` and `prune`: the sandboxes in the state database."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from typing import TYPE_CHECKING

import click

from matchlock.errors import MatchlockError

if TYPE_CHECKING:
    from matchlock.state.registry import Owner

STOP_WAIT_S = 60.0


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
@click.option("--running", is_flag=True, help="Only running sandboxes.")
@click.option("-a", "--all", "all_", is_flag=True,
              help="Also removed sandboxes whose records are kept (for `inspect`).")
def ls(as_json: bool, running: bool = False, all_: bool = False) -> None:
    """List sandboxes, newest first: creating, booting, running, stopping, stopped or
    crashed (its owner died)."""
    from matchlock.state import registry

    entries = [e for e in reversed(registry.entries(include_removed=all_))
               if not running or e.status == "running"]
    if as_json:
        click.echo(json.dumps([_summary(e) for e in entries]))
        return
    click.echo(f"{'ID':<12} {'STATUS':<8} {'IMAGE':<32} {'CREATED':<20} PID")
    for e in entries:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.owner.created))
        pid = e.owner.pid if e.status in registry.ACTIVE else "-"
        click.echo(f"{e.owner.id:<12} {e.status:<8} {e.owner.image:<32} {created:<20} {pid}")


def _summary(e: object) -> dict[str, object]:
    from matchlock.state.registry import Entry

    assert isinstance(e, Entry) and e.record is not None
    r = e.record
    return {"id": r.id, "image": r.image, "status": e.status, "created": r.created,
            "pid": r.owner_pid, "ended": r.ended, "end_reason": r.end_reason,
            "exit_code": r.exit_code}


def _stop(sid: str) -> str:
    """Stop a live sandbox: ask its supervisor, or signal a `run`'s owner; wait for it.
    Returns its full id."""
    from matchlock.sandbox.control import connect, request
    from matchlock.state import registry

    entry = registry.lookup(sid)
    sid = entry.owner.id
    if entry.status not in registry.ACTIVE:
        raise MatchlockError(f"sandbox {sid} is not running ({entry.status})")
    owner = entry.owner
    registry.add_event(sid, "kill requested", f"by pid {os.getpid()}")
    if entry.status == "running" and (entry.path / registry.SOCKET).exists():
        try:
            request(connect(sid), {"op": "shutdown"})
        except (MatchlockError, OSError):
            _signal(owner, signal.SIGTERM)
    else:
        _signal(owner, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_S
    while owner.alive:
        if time.monotonic() > deadline:
            _signal(owner, signal.SIGKILL)  # the VMM dies with it; `gc` removes the rest
            break
        time.sleep(0.02)
    return sid


def _signal(owner: Owner, signo: int) -> None:
    if owner.alive:  # never a recycled pid, nor one of another boot
        with contextlib.suppress(ProcessLookupError):
            os.kill(owner.pid, signo)


@click.command()
@click.option("--all", "all_", is_flag=True, help="Every running sandbox.")
@click.argument("sandbox_id", required=False)
def kill(all_: bool, sandbox_id: str | None) -> None:
    """Stop a running sandbox (its files stay until `matchlock rm`)."""
    from matchlock.state import registry

    if all_ == (sandbox_id is not None):
        raise MatchlockError("give a sandbox id or --all (not both)")
    ids = ([e.owner.id for e in registry.entries() if e.status in registry.ACTIVE] if all_
           else [str(sandbox_id)])
    for sid in ids:
        click.echo(f"Killed {_stop(sid)}")


def _remove(sid: str, force: bool) -> str:
    from matchlock.state import registry

    entry = registry.lookup(sid)
    sid = entry.owner.id
    if entry.status in registry.ACTIVE:
        if not force:
            raise MatchlockError(f"sandbox {sid} is {entry.status}",
                                 hint=f"`matchlock kill {sid}` first, or rm -f")
        _stop(sid)
        entry = registry.lookup(sid, include_removed=True)
        if entry.status == "removed":
            return sid  # its owner removed it on the way out (an rpc process does)
    registry.collect(entry.path, entry.owner)
    return sid


def _release_vmm_ids() -> None:
    from matchlock.vm import confine

    if confine.enabled():
        confine.remove_stale_ids()  # the VMM user ids of dead owners


@click.command()
@click.option("-f", "--force", is_flag=True, help="Kill it first if it is running.")
@click.option("--stopped", is_flag=True, help="Every stopped or crashed sandbox.")
@click.argument("sandbox_ids", nargs=-1)
def rm(force: bool, sandbox_ids: tuple[str, ...], stopped: bool = False) -> None:
    """Remove stopped or crashed sandboxes (a running one needs `kill` first, or -f)."""
    from matchlock.state import registry

    if stopped == bool(sandbox_ids):
        raise MatchlockError("give sandbox ids or --stopped (not both)")
    if stopped:
        # Collected from the list itself: one that another process removes meanwhile is
        # no error (collect is idempotent).
        ended = [e for e in registry.entries() if e.status not in registry.ACTIVE]
        for e in ended:
            click.echo(f"Removed {registry.collect(e.path, e.owner).id}")
        _release_vmm_ids()
        return
    for sid in sandbox_ids:
        click.echo(f"Removed {_remove(sid, force)}")
        _release_vmm_ids()


@click.command()
def prune() -> None:
    """Remove every stopped or crashed sandbox, and forget old records of removed ones."""
    from matchlock.state import registry

    ended = [e for e in registry.entries() if e.status not in registry.ACTIVE]
    for e in ended:
        click.echo(f"Pruned {registry.collect(e.path, e.owner).id}")
    if ended:
        _release_vmm_ids()
    registry.purge_removed()
    click.echo(f"Pruned {len(ended)} sandbox{'es' if len(ended) != 1 else ''}")
