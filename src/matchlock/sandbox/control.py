"""The client side of a detached sandbox's control socket (`exec`, `kill`): kept free of the
sandbox machinery so that a fresh `matchlock exec` imports little."""

from __future__ import annotations

import socket
from collections.abc import Iterator

from matchlock.errors import MatchlockError
from matchlock.sandbox import wire
from matchlock.sandbox.sockpath import sock_path

__all__ = ["connect", "frames", "request", "sock_path"]


def frames(conn: socket.socket, dec: wire.Decoder) -> Iterator[wire.Frame]:
    while True:
        data = conn.recv(1 << 16)
        if not data:
            if dec.pending:
                raise wire.WireError("truncated frame")
            return
        yield from dec.feed(data)



def connect(sid: str) -> socket.socket:
    """A connection to a running detached sandbox's supervisor, or a one-line error."""
    from matchlock.state import registry  # SQLite: not for the exec fast path (sock_path)

    entry = registry.lookup(sid)
    if entry.status != "running":
        raise MatchlockError(f"sandbox {sid} is {entry.status}",
                             hint=f"remove it with `matchlock rm {sid}`")
    path = entry.path / registry.SOCKET
    if not path.exists():
        raise MatchlockError(f"sandbox {sid} was not started with `run -d` (or is starting)")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sock_path(path))
    except OSError as e:
        s.close()
        raise MatchlockError(f"cannot reach sandbox {sid}'s supervisor: {e.strerror}") from None
    return s


def request(s: socket.socket, obj: dict[str, object]) -> wire.Frame | None:
    """Send a one-shot request; the first frame of the answer (None at EOF)."""
    s.sendall(wire.encode_json(wire.REQUEST, obj))
    dec = wire.Decoder()
    for f in frames(s, dec):
        return f
    return None
