"""The supervisor's reading of a client's request (the `H` frame's JSON object): every field
checked. Apart from `wire.py` (the frames), which a fresh `matchlock exec` imports: only the
supervisor needs this."""

from __future__ import annotations

from typing import Any, NamedTuple

from matchlock.sandbox.wire import WireError

MAX_HOSTS = 1024


def _str_list(v: object, name: str, limit: int = 4096) -> list[str]:
    if not isinstance(v, list) or len(v) > limit or not all(isinstance(s, str) for s in v):
        raise WireError(f"{name} must be a list of strings")
    if any("\0" in s for s in v):
        raise WireError(f"{name} contains a NUL byte")
    return list(v)


def _opt_str(v: object, name: str) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or "\0" in v or len(v) > 4096:
        raise WireError(f"{name} must be a string")
    return v


class ExecSpec(NamedTuple):
    """An exec request as the supervisor accepts it (every field checked)."""

    argv: list[str]
    env: list[str]
    workdir: str | None
    user: str | None
    stdin: bool
    tty: bool = False
    rows: int = 24
    cols: int = 80


class AllowListRequest(NamedTuple):
    """`allow-list` (read), `allow-list-add` or `allow-list-delete`; hosts are checked by the
    policy's own parser, in the supervisor."""

    action: str  # "list", "add" or "delete"
    hosts: list[str]


class ForwardRequest(NamedTuple):
    """`port-forward`: pipe this connection to 127.0.0.1:`port` in the guest."""

    port: int


ALLOW_LIST_OPS = {"allow-list": "list", "allow-list-add": "add", "allow-list-delete": "delete"}


class PoolRequest(NamedTuple):
    """A warm pool member (`matchlock pool`): `claim` it (resume, then run `argv` in the
    background, as `run -d` would) or `release` it (stop it, unless it was claimed).
    `pool` is the pool's name and instance token: a member of another pool never answers."""

    action: str  # "claim" or "release"
    pool: str
    argv: list[str]


def parse_request(obj: dict[str, Any]
                  ) -> ExecSpec | AllowListRequest | ForwardRequest | PoolRequest | str:
    """The validated request: an ExecSpec, AllowListRequest, ForwardRequest or PoolRequest,
    or the op name "shutdown"/"ping"."""
    op = obj.get("op")
    if op in ("pool-claim", "pool-release"):
        if set(obj) != {"op", "pool", "argv"}:
            raise WireError(f"{op} takes exactly a pool and an argv")
        pool = obj["pool"]
        if not isinstance(pool, str) or not 0 < len(pool) <= 200:
            raise WireError("pool must be a string of 1 to 200 characters")
        return PoolRequest(op.removeprefix("pool-"), pool, _str_list(obj["argv"], "argv"))
    if op in ("shutdown", "ping"):
        if set(obj) != {"op"}:
            raise WireError(f"unexpected fields in {op}")
        return str(op)
    if isinstance(op, str) and op in ALLOW_LIST_OPS:
        action = ALLOW_LIST_OPS[op]
        if set(obj) != ({"op"} if action == "list" else {"op", "hosts"}):
            raise WireError(f"{op} takes exactly " + ("no fields" if action == "list" else
                                                      "a hosts list"))
        hosts = [] if action == "list" else _str_list(obj["hosts"], "hosts", MAX_HOSTS)
        if action != "list" and not hosts:
            raise WireError("hosts must not be empty")
        return AllowListRequest(action, hosts)
    if op == "port-forward":
        port = obj.get("port")
        if set(obj) != {"op", "port"} or isinstance(port, bool) or not isinstance(port, int) \
                or not 1 <= port <= 65535:
            raise WireError("port-forward takes a port from 1 to 65535")
        return ForwardRequest(port)
    if op != "exec":
        raise WireError(f"unknown op {op!r}")
    allowed = {"op", "argv", "env", "workdir", "user", "stdin", "tty", "rows", "cols"}
    extra = set(obj) - allowed
    if extra:
        raise WireError(f"unexpected fields: {', '.join(sorted(extra))}")
    argv = _str_list(obj.get("argv"), "argv")
    if not argv or not argv[0]:
        raise WireError("argv must not be empty")
    env = _str_list(obj.get("env", []), "env")
    for e in env:
        name, sep, _ = e.partition("=")
        if not sep or not name or any(c.isspace() for c in name):
            raise WireError(f"invalid environment entry {e!r}")
    workdir = _opt_str(obj.get("workdir"), "workdir")
    if workdir is not None and not workdir.startswith("/"):
        raise WireError("workdir must be absolute")
    user = _opt_str(obj.get("user"), "user")
    stdin = obj.get("stdin", False)
    tty = obj.get("tty", False)
    if not isinstance(stdin, bool) or not isinstance(tty, bool):
        raise WireError("stdin and tty must be booleans")
    rows, cols = obj.get("rows", 24), obj.get("cols", 80)
    for v in (rows, cols):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 0xFFFF:
            raise WireError("rows and cols must be integers from 1 to 65535")
    return ExecSpec(argv, env, workdir, user, stdin, tty, rows, cols)
