"""`matchlock get` (the short record) and `matchlock inspect` / `stat` (everything recorded:
owner, VMM, config, lifecycle history, cleanup steps, why it ended). Removed sandboxes whose
records are kept can be inspected too."""

from __future__ import annotations

import json
import time
from typing import Any

import click


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _end(r: Any) -> dict[str, Any] | None:
    if r.end_reason is None:
        return None
    return {"reason": r.end_reason, "detail": r.end_detail, "exit_code": r.exit_code}


@click.command()
@click.argument("sandbox_id")
def get(sandbox_id: str) -> None:
    """Print a sandbox's record as JSON: id, status, image, owner pid, config."""
    from matchlock.state import registry

    e = registry.lookup(sandbox_id, include_removed=True)
    assert e.record is not None
    r = e.record
    click.echo(json.dumps({
        "id": r.id, "status": e.status, "image": r.image, "created_at": _iso(r.created),
        "pid": r.owner_pid, "ended_at": _iso(r.ended), "end": _end(r), "config": r.config,
    }, indent=2))


@click.command()
@click.argument("sandbox_id")
def inspect(sandbox_id: str) -> None:
    """Print everything recorded about a sandbox as JSON."""
    from matchlock.state import registry

    e = registry.lookup(sandbox_id, include_removed=True)
    assert e.record is not None
    r = e.record
    history = [{**h, "at": _iso(h["at"])} for h in registry.history(r.id)]
    cleanup = [{**c, "at": _iso(c["at"])} for c in registry.cleanup_steps(r.id)]
    click.echo(json.dumps({
        "id": r.id,
        "status": e.status,
        "image": r.image,
        "created_at": _iso(r.created),
        "updated_at": _iso(r.updated),
        "ended_at": _iso(r.ended),
        "end": _end(r),
        "owner": {"pid": r.owner_pid, "start_ticks": r.owner_start,
                  "alive": r.owner.alive},
        "vmm": {"pid": r.vmm_pid, "start_ticks": r.vmm_start, "alive": r.owner.vmm_alive},
        "boot_id": r.boot_id,
        "directory": str(e.path) if e.path.exists() else None,
        "config": r.config,
        "lifecycle": history[-1] if history else None,
        "history": history,
        "cleanup": cleanup,
    }, indent=2))
