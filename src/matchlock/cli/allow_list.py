"""`matchlock allow-list add|delete|list ID [HOST[,HOST...]]...`: change a running detached
sandbox's egress allow-list without restarting it (through its supervisor)."""

from __future__ import annotations

import click

from matchlock.errors import MatchlockError

_EMPTY = "(empty: all egress denied)"


def _hosts(values: tuple[str, ...]) -> list[str]:
    """Comma-split, trimmed, deduplicated and checked like --allow-host (the supervisor
    checks again with the same parser)."""
    from matchlock.net.policy import parse_rule, split_specs

    items = list(dict.fromkeys(split_specs(values)))
    if not items:
        raise MatchlockError("no host given", hint="matchlock allow-list add ID HOST[,HOST...]")
    for item in items:
        try:
            parse_rule(item)
        except ValueError as e:
            raise MatchlockError(f"invalid host: {e}",
                                 hint="use HOST, *.DOMAIN or HOST:PORT, as for --allow-host"
                                 ) from None
    return items


def _change(op: str, sid: str, hosts: list[str]) -> tuple[list[str], list[str]]:
    from matchlock.sandbox import wire
    from matchlock.sandbox.control import connect, request

    req: dict[str, object] = {"op": op}
    if op != "allow-list":
        req["hosts"] = hosts
    sock = connect(sid)
    try:
        answer = request(sock, req)
    except wire.WireError as e:
        raise MatchlockError(f"bad answer from the sandbox's supervisor: {e}") from None
    finally:
        sock.close()
    if answer is None:
        raise MatchlockError("the sandbox's supervisor closed the connection")
    try:
        obj = answer.json()
    except wire.WireError as e:
        raise MatchlockError(f"bad answer from the sandbox's supervisor: {e}") from None
    if answer.type == wire.ERROR:
        raise MatchlockError(str(obj.get("message", "error")))
    changed, allowed = obj.get("changed"), obj.get("allowed")
    if answer.type != wire.ANSWER or not _strings(changed) or not _strings(allowed):
        raise MatchlockError("bad answer from the sandbox's supervisor")
    return changed, allowed  # type: ignore[return-value]


def _strings(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def _current(allowed: list[str]) -> None:
    click.echo(f"Current allow-list: {','.join(allowed) if allowed else _EMPTY}")


@click.group("allow-list")
def allow_list() -> None:
    """Change a running sandbox's egress allow-list (started with `run -d` or --rm=false)."""


@allow_list.command("add")
@click.argument("sandbox_id")
@click.argument("hosts", nargs=-1, required=True)
def add(sandbox_id: str, hosts: tuple[str, ...]) -> None:
    """Allow HOST[,HOST...] (as --allow-host: HOST, *.DOMAIN, HOST:PORT) from now on."""
    changed, allowed = _change("allow-list-add", sandbox_id, _hosts(hosts))
    click.echo(f"Added to {sandbox_id}: {','.join(changed)}" if changed
               else f"No new hosts were added to {sandbox_id}")
    _current(allowed)


@allow_list.command("delete")
@click.argument("sandbox_id")
@click.argument("hosts", nargs=-1, required=True)
def delete(sandbox_id: str, hosts: tuple[str, ...]) -> None:
    """Stop allowing HOST[,HOST...]: new lookups, connections and requests are refused, and
    raw TCP, WebSocket and HTTP exchanges in flight to them are cut."""
    changed, allowed = _change("allow-list-delete", sandbox_id, _hosts(hosts))
    click.echo(f"Removed from {sandbox_id}: {','.join(changed)}" if changed
               else f"No hosts were removed from {sandbox_id}")
    _current(allowed)


@allow_list.command("list")
@click.argument("sandbox_id")
def list_(sandbox_id: str) -> None:
    """Print the current allow-list."""
    _, allowed = _change("allow-list", sandbox_id, [])
    _current(allowed)
