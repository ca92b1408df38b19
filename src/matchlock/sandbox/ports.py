"""Published ports (`run -p [LOCAL:]REMOTE`): a host TCP listener per port, each accepted
connection relayed to 127.0.0.1:REMOTE in the guest over a CONNECT channel of the agent's
control connection. The guest's NIC is never used, so this works with `--no-network`.

Per connection two threads: host → guest (`Stream.write`, windowed by the guest's
acknowledgements) and guest → host (`Stream.read`, acknowledged once written to the host
socket, so a slow host client slows the guest peer instead of filling memory). Half-closes pass
through both ways; an error in the guest (a reset) resets the host connection.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from matchlock.errors import MatchlockError
from matchlock.guest.client import AgentConnection, AgentGone, Stream

ACCEPT_POLL = 0.5  # how often an accept loop checks whether it was closed
MAX_CONNECTIONS = 256  # concurrent relayed connections per sandbox; more are closed at once
_HINT = "use -p [LOCAL:]REMOTE with ports 1-65535, e.g. -p 8080 or -p 18080:8080"


@dataclass(frozen=True)
class PortSpec:
    local: int
    remote: int


def _port(text: str, spec: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        raise MatchlockError(f"invalid --publish {spec!r}: {text!r} is not a port number",
                             hint=_HINT)
    n = int(text)
    if not 1 <= n <= 65535:
        raise MatchlockError(f"invalid --publish {spec!r}: port {n} is out of range 1-65535",
                             hint=_HINT)
    return n


def parse_publish(specs: Sequence[str], address: str) -> list[PortSpec]:
    """Validate -p specs and --address; a MatchlockError (one line) names what is wrong."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise MatchlockError(f"invalid --address {address!r}: not an IP address",
                             hint="use an address of this host, e.g. 127.0.0.1") from None
    out: list[PortSpec] = []
    seen: set[int] = set()
    for spec in specs:
        local_s, sep, remote_s = spec.rpartition(":")
        remote = _port(remote_s, spec)
        local = _port(local_s, spec) if sep else remote
        if local in seen:
            raise MatchlockError(f"invalid --publish {spec!r}: host port {local} is published "
                                 "twice", hint=_HINT)
        seen.add(local)
        out.append(PortSpec(local, remote))
    return out


def check_available(specs: Sequence[PortSpec], address: str) -> None:
    """Fail fast (before any image work) when a host port cannot be bound; `run_attached`
    binds for real later."""
    PortForwarder(specs, address).close()


class PortForwarder:
    """Binds every listener at construction (so a port in use fails before the sandbox
    exists); `start` begins relaying once the agent is up; `close` ends everything."""

    def __init__(self, specs: Sequence[PortSpec], address: str) -> None:
        self._address = address
        self._listeners: list[tuple[socket.socket, PortSpec]] = []
        self._lock = threading.Lock()
        self._clients: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            for spec in specs:
                s = socket.socket(family, socket.SOCK_STREAM)
                self._listeners.append((s, spec))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((address, spec.local))
                    s.listen(128)
                except OSError as e:
                    raise MatchlockError(
                        f"cannot publish port {spec.local} on {address}: "
                        f"{e.strerror or e}".rstrip(),
                        hint="choose another host port: -p LOCAL:" + str(spec.remote)) from None
                s.settimeout(ACCEPT_POLL)
        except BaseException:
            self.close()
            raise

    def start(self, conn: AgentConnection) -> None:
        for listener, spec in self._listeners:
            t = threading.Thread(target=self._accept_loop, args=(conn, listener, spec),
                                 name=f"publish-{spec.local}", daemon=True)
            self._threads.append(t)
            t.start()

    def _accept_loop(self, conn: AgentConnection, listener: socket.socket,
                     spec: PortSpec) -> None:
        while not self._closed and conn.error is None:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            with self._lock:
                if self._closed:
                    client.close()
                    return
                if len(self._clients) >= MAX_CONNECTIONS:
                    client.close()
                    continue
                self._clients.add(client)
            threading.Thread(target=self._relay, args=(conn, client, spec.remote),
                             name=f"publish-{spec.local}-conn", daemon=True).start()

    def _relay(self, conn: AgentConnection, client: socket.socket, remote: int) -> None:
        reset = False
        try:
            try:
                stream = conn.connect(remote)
            except AgentGone:
                return
            up = threading.Thread(target=_upload, args=(client, stream), daemon=True)
            up.start()
            reset = _download(client, stream)
            # The channel is over: wake the upload thread if it still waits on the client.
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RD)
            up.join()
        finally:
            with self._lock:
                self._clients.discard(client)
            if reset:  # the guest connection failed: the host client sees a reset too
                with contextlib.suppress(OSError):
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                      struct.pack("ii", 1, 0))
            client.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            clients = list(self._clients)
        for c in clients:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in self._threads:  # accept loops notice within ACCEPT_POLL
            t.join(timeout=2 * ACCEPT_POLL)
        for listener, _ in self._listeners:
            listener.close()


def _download(client: socket.socket, stream: Stream) -> bool:
    """Guest → host until the channel ends; True when the host connection should be reset
    (the guest side failed after it was connected)."""
    try:
        while True:
            data = stream.read()
            if data is None:
                break
            if not data:
                client.shutdown(socket.SHUT_WR)
                continue
            client.sendall(data)
            stream.ack(len(data))
    except OSError:  # the host client went away: abort the guest side
        with contextlib.suppress(AgentGone):
            stream.kill()
        stream.abandon()
        return True
    except AgentGone:
        stream.abandon()
        return True
    res = stream.result
    return res is not None and res.errno != 0 and stream.connected


def _upload(client: socket.socket, stream: Stream) -> None:
    """Host → guest: the client's bytes, then its EOF as a half-close."""
    try:
        while True:
            data = client.recv(65536)
            if not data:
                stream.close_write()
                return
            stream.write(data)
    except OSError:
        with contextlib.suppress(AgentGone):
            stream.kill()
    except AgentGone:
        pass
