"""A TCP connection to a guest port, carried over a detached sandbox's control socket: the
`port-forward` op of `sandbox/wire.py`, both ends.

Supervisor side (`serve_pipe`): the guest end is a CONNECT channel of the agent
(`guest.client.Stream`); `D` frames from the client are written to it (windowed by the guest's
acknowledgements, so a slow guest slows the client through the socket's buffer), and its bytes
go out as `D` frames, acknowledged once the client's socket took them. Half-closes pass as `F`.

Client side (`PipeClient`): looks like a `guest.client.Stream` to `sandbox.ports`, so
`matchlock port-forward` reuses the listeners and relay threads of published ports.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

from matchlock.errors import MatchlockError
from matchlock.guest import protocol as p
from matchlock.guest.client import AgentGone, Stream
from matchlock.sandbox import wire
from matchlock.sandbox.control import connect, frames

CHUNK = 1 << 16


# --- the supervisor's end ------------------------------------------------------------------


def serve_pipe(conn: socket.socket, incoming: Iterator[wire.Frame], stream: Stream) -> None:
    """Relay until the guest channel ends (only this thread writes to `conn`; `incoming` is
    read by a thread of its own). `conn` is left for the caller to close."""
    send = conn.sendall

    done = threading.Event()
    up = threading.Thread(target=_client_to_guest, args=(incoming, stream, conn, done),
                          name="pipe-up", daemon=True)
    up.start()
    try:
        while True:
            data = stream.read()
            if data is None:
                break
            if not data:
                send(wire.encode(wire.FIN))
                continue
            for i in range(0, len(data), wire.MAX_PAYLOAD):
                send(wire.encode(wire.DATA, data[i:i + wire.MAX_PAYLOAD]))
            stream.ack(len(data))
    except OSError:  # the client went away: reset the guest side
        with contextlib.suppress(AgentGone):
            stream.kill()
        stream.abandon()
        return
    except AgentGone as e:
        stream.abandon()
        with contextlib.suppress(OSError):
            send(wire.encode_json(wire.ERROR, {"message": f"lost the guest agent: {e}",
                                               "errno": 0, "connected": stream.connected}))
        return
    finally:
        # The channel is over: wake the upload thread if it still waits on the client.
        done.set()
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RD)
        up.join()
    res = stream.result
    with contextlib.suppress(OSError):
        if res is None or res.errno == 0:
            send(wire.encode_json(wire.EXIT, {"code": 0}))
        else:
            send(wire.encode_json(wire.ERROR, {"message": res.message, "errno": res.errno,
                                               "connected": stream.connected}))


def _client_to_guest(incoming: Iterator[wire.Frame], stream: Stream, conn: socket.socket,
                     done: threading.Event) -> None:
    """The client's bytes and half-close; a client that closes without `F`, or breaks the
    protocol, resets the guest connection."""
    fin = False
    try:
        for f in incoming:
            if f.type == wire.DATA and f.payload and not fin:
                stream.write(f.payload)
            elif f.type == wire.FIN and not f.payload and not fin:
                stream.close_write()
                fin = True
            else:
                raise wire.WireError(f"unexpected frame {chr(f.type)!r} in a port-forward pipe")
        if fin or done.is_set():
            return  # EOF after a half-close, or the supervisor's own shutdown at the end
    except (wire.WireError, OSError):
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
    except AgentGone:
        return
    if not done.is_set():
        with contextlib.suppress(AgentGone):
            stream.kill()


# --- the client's end (`matchlock port-forward`) -------------------------------------------


class PipeClient:
    """One guest connection through the supervisor of sandbox `sid`: the `sandbox.ports.Relay`
    interface (`read` → bytes, b"" at the guest's half-close, None at the end)."""

    def __init__(self, sid: str, port: int) -> None:
        self.connected = False
        self._result: p.Result | None = None
        self._sock = connect(sid)
        self._lock = threading.Lock()
        self._dec = wire.Decoder()
        self._pending: list[wire.Frame] = []
        try:
            self._sock.sendall(wire.encode_json(wire.REQUEST, {"op": "port-forward",
                                                               "port": port}))
        except OSError as e:
            self._sock.close()
            raise MatchlockError(f"cannot reach the sandbox's supervisor: {e.strerror}") from None
        self._frames = frames(self._sock, self._dec)

    @property
    def result(self) -> p.Result | None:
        return self._result

    def read(self, timeout: float | None = None) -> bytes | None:
        if self._result is not None:
            return None
        try:
            f = next(self._frames, None)
        except wire.WireError as e:
            self._end(p.Result(1, f"bad answer from the supervisor: {e}"), False)
            return None
        except OSError as e:
            self._end(p.Result(e.errno or 1, e.strerror or str(e)), self.connected)
            return None
        if f is None:
            self._end(p.Result(1, "the supervisor closed the connection"), self.connected)
            return None
        if f.type == wire.DATA and f.payload:
            self.connected = True
            return f.payload
        if f.type == wire.FIN:
            self.connected = True
            return b""
        if f.type == wire.EXIT:
            self._end(p.Result(0, ""), True)
            return None
        if f.type == wire.ERROR:
            try:
                obj = f.json()
            except wire.WireError:
                obj = {}
            errno = obj.get("errno")
            self._end(p.Result(errno if isinstance(errno, int) and errno else 1,
                               str(obj.get("message", "error"))), obj.get("connected") is True)
            return None
        self._end(p.Result(1, f"unexpected frame {chr(f.type)!r}"), self.connected)
        return None

    def _end(self, result: p.Result, connected: bool) -> None:
        self._result = result
        self.connected = connected

    def ack(self, n: int) -> None:
        """Nothing to do: the socket's own buffers pace the supervisor."""

    def write(self, data: bytes) -> None:
        for i in range(0, len(data), CHUNK):
            with self._lock:
                self._sock.sendall(wire.encode(wire.DATA, data[i:i + CHUNK]))

    def close_write(self) -> None:
        with self._lock, contextlib.suppress(OSError):
            self._sock.sendall(wire.encode(wire.FIN))

    def kill(self) -> None:
        """Reset the guest connection: the supervisor sees the socket end without `F`."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def abandon(self) -> None:
        self._sock.close()

    def close(self) -> None:
        self._sock.close()
