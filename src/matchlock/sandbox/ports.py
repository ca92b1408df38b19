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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from matchlock.errors import MatchlockError
from matchlock.guest.client import AgentConnection, AgentGone
from matchlock.guest.protocol import Result

ACCEPT_POLL = 0.5  # how often an accept loop checks whether it was closed
MAX_CONNECTIONS = 256  # concurrent relayed connections per sandbox; more are closed at once
_HINT = "use -p [LOCAL:]REMOTE with ports 1-65535, e.g. -p 8080 or -p 18080:8080"


@dataclass(frozen=True)
class PortSpec:
    local: int  # 0: any free port (the API; the CLI asks for 1-65535)
    remote: int


@dataclass(frozen=True)
class Binding:
    """One listening socket: host address and port (the real one when 0 was asked for)."""

    address: str
    local_port: int
    remote_port: int


def _port(text: str, spec: str, flag: str, hint: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        raise MatchlockError(f"invalid {flag} {spec!r}: {text!r} is not a port number",
                             hint=hint)
    n = int(text)
    if not 1 <= n <= 65535:
        raise MatchlockError(f"invalid {flag} {spec!r}: port {n} is out of range 1-65535",
                             hint=hint)
    return n


def parse_address(address: str) -> str:
    """An --address value: an IP literal, or `localhost` (= 127.0.0.1)."""
    if address == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        raise MatchlockError(f"invalid --address {address!r}: not an IP address",
                             hint="use an address of this host, e.g. 127.0.0.1") from None


def parse_publish(specs: Sequence[str], address: str | Sequence[str], *,
                  flag: str = "--publish", hint: str = _HINT) -> list[PortSpec]:
    """Validate -p specs and --address; a MatchlockError (one line) names what is wrong."""
    for a in [address] if isinstance(address, str) else address:
        parse_address(a)
    out: list[PortSpec] = []
    seen: set[int] = set()
    for spec in specs:
        local_s, sep, remote_s = spec.rpartition(":")
        remote = _port(remote_s, spec, flag, hint)
        local = _port(local_s, spec, flag, hint) if sep else remote
        if local in seen:
            raise MatchlockError(f"invalid {flag} {spec!r}: host port {local} is given twice",
                                 hint=hint)
        seen.add(local)
        out.append(PortSpec(local, remote))
    return out


def check_available(specs: Sequence[PortSpec], address: str | Sequence[str]) -> None:
    """Fail fast (before any image work) when a host port cannot be bound; `run_attached`
    binds for real later."""
    PortForwarder(specs, address).close()


class PortForwarder:
    """Binds every listener at construction (so a port in use fails before the sandbox
    exists); `start` begins relaying once the agent is up; `close` ends everything."""

    def __init__(self, specs: Sequence[PortSpec], address: str | Sequence[str] = "127.0.0.1",
                 *, hint: str = "choose another host port: -p LOCAL:REMOTE") -> None:
        addresses = [address] if isinstance(address, str) else list(address)
        self._listeners: list[tuple[socket.socket, PortSpec]] = []
        self.bindings: list[Binding] = []
        self._lock = threading.Lock()
        self._clients: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        try:
            for addr in dict.fromkeys(parse_address(a) for a in addresses):
                for spec in specs:
                    self._bind(addr, spec, hint)
        except BaseException:
            self.close()
            raise

    def _bind(self, address: str, spec: PortSpec, hint: str) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        self._listeners.append((s, spec))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, spec.local))
            s.listen(128)
        except OSError as e:
            raise MatchlockError(
                f"cannot listen on {address} port {spec.local}: {e.strerror or e}".rstrip(),
                hint=hint) from None
        s.settimeout(ACCEPT_POLL)
        self.bindings.append(Binding(address, s.getsockname()[1], spec.remote))

    def start(self, conn: AgentConnection) -> None:
        self.start_with(conn.connect, lambda: conn.error is None)

    def start_with(self, connect: Callable[[int], Relay], alive: Callable[[], bool]) -> None:
        """Relay every accepted connection through `connect(remote_port)`: a CONNECT
        channel (`start`), or a pipe through a detached sandbox's supervisor."""
        for (listener, spec), b in zip(self._listeners, self.bindings, strict=True):
            t = threading.Thread(target=self._accept_loop, args=(connect, alive, listener, spec),
                                 name=f"publish-{b.local_port}", daemon=True)
            self._threads.append(t)
            t.start()

    def _accept_loop(self, connect: Callable[[int], Relay], alive: Callable[[], bool],
                     listener: socket.socket, spec: PortSpec) -> None:
        while not self._closed and alive():
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
            threading.Thread(target=self._relay, args=(connect, client, spec.remote),
                             name="publish-conn", daemon=True).start()

    def _relay(self, connect: Callable[[int], Relay], client: socket.socket,
               remote: int) -> None:
        reset = False
        stream: Relay | None = None
        try:
            try:
                stream = connect(remote)
            except (AgentGone, MatchlockError, OSError):
                return
            up = threading.Thread(target=_upload, args=(client, stream), daemon=True)
            up.start()
            reset = _download(client, stream)
            # The channel is over: wake the upload thread if it still waits on the client.
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RD)
            up.join()
        finally:
            close = getattr(stream, "close", None) if stream is not None else None
            if close is not None:  # a pipe through a supervisor owns a socket
                close()
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


class Relay(Protocol):
    """One relayed connection to a guest port: what `_download`/`_upload` need of it
    (`guest.client.Stream`, or `sandbox.pipe.PipeClient` through a supervisor)."""

    connected: bool

    @property
    def result(self) -> Result | None: ...
    def read(self, timeout: float | None = None) -> bytes | None: ...
    def ack(self, n: int) -> None: ...
    def write(self, data: bytes) -> None: ...
    def close_write(self) -> None: ...
    def kill(self) -> None: ...
    def abandon(self) -> None: ...


def _download(client: socket.socket, stream: Relay) -> bool:
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


def _upload(client: socket.socket, stream: Relay) -> None:
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
