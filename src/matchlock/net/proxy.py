"""The sandbox's transparent egress proxy (docs/network.md, "The proxy"): connection entry,
TLS termination and request admission. The layers it hands connections to live beside it:
`classify` (what the first bytes are), `http1relay` and `h2relay` (requests), `websocket`
(frames after an upgrade), `raw` (uninspected TCP) and `audit`.

Every guest TCP connection arrives here with the `Target` the plumbing learnt (the name the
guest resolved through the sandbox's DNS, the address and port it dialled). The proxy peeks at
the first bytes without consuming them (MSG_PEEK), so the kernel still holds the ClientHello
when the event loop's own TLS implementation takes over the socket:

- TLS: the SNI must equal the target's name and (name, port) must be allowed, *before* the
  handshake; otherwise a TLS alert and close. Then TLS with a leaf for the name, HTTP/1.1 or
  HTTP/2 as the guest offers (ALPN).
- Plain HTTP (anything an origin could read as a request line): the same per request, minus
  TLS.
- Anything else: spliced to name:port if the policy allows raw TCP there (a port the user
  named), else reset.

Per HTTP request: `Host`/`:authority` must equal the name, the policy is checked again (runtime
changes), placeholders are swapped for the secrets valid for that host (any other placeholder
→ 403), and one audit event is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from matchlock.net import http1
from matchlock.net.audit import AuditEvent, AuditSink
from matchlock.net.certs import CertificateAuthority
from matchlock.net.classify import MAX_FIRST_LINE, Kind, classify
from matchlock.net.http1 import HttpError
from matchlock.net.limits import DEFAULT_MAX_CONNECTIONS
from matchlock.net.logutil import warn
from matchlock.net.policy import Decision, Policy, normalize_name
from matchlock.net.raw import relay_raw
from matchlock.net.secrets import SecretSet
from matchlock.net.streams import Stream
from matchlock.net.target import Target
from matchlock.net.tls_sniff import AlertDescription, ClientHello, Invalid, Sniff, alert, sniff
from matchlock.net.upstream import Connection, Upstream

if TYPE_CHECKING:
    from matchlock.net.hookrun import Hooks

log = logging.getLogger(__name__)

SNIFF_WAIT = 0.25  # server-speaks-first protocols (SMTP, MySQL, …) get raw TCP after this
HELLO_TIMEOUT = 10.0  # to receive a whole ClientHello / first request line
HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 300.0  # keep-alive connection idle between requests
LINGER = 1.0  # after an error response, read and drop the guest's input this long at most
LINGER_BYTES = 1 << 20
PEEK_SIZE = max(16384 + 5, MAX_FIRST_LINE + 1)  # a whole ClientHello record, or a first line


def _classify(data: bytes) -> tuple[Kind, ClientHello | Invalid | None]:
    """classify(), plus the parsed ClientHello for TLS (parsed once per connection)."""
    kind = classify(data)
    if kind != "tls":
        return kind, None
    hello = sniff(data)
    if isinstance(hello, Sniff):
        return "more", None
    return "tls", hello


_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    505: "HTTP Version Not Supported",
}


@dataclass(slots=True)
class Blocked:
    """A request the proxy answers itself (403/400/502) instead of forwarding."""

    status: int
    reason: str
    rule: str | None = None


@dataclass(frozen=True, slots=True)
class Tunnel:
    """A guest connection that is carrying bytes to an origin right now: a tunnel (raw TCP,
    a WebSocket), or an HTTP exchange in flight. Where it goes, and whether it needs raw TCP
    there."""

    target: Target
    name: str | None  # the name it was admitted for; None: by address (open mode)
    raw: bool
    upstream: Stream | None  # None: an HTTP exchange (its upstream may change on a retry)


@dataclass(slots=True)
class Conn:
    """What is known about one guest connection."""

    target: Target
    name: str | None  # the verified name (target's, or SNI/Host in open mode), None = by address
    protocol: str  # http, https, h2
    tls: bool


def response_for(blocked: Blocked) -> bytes:
    """A complete HTTP/1.1 error response whose body tells the guest what happened and why."""
    title = "blocked by the sandbox's egress policy" if blocked.status == 403 else "proxy error"
    lines = [f"matchlock: {title}", f"reason: {blocked.reason}"]
    if blocked.rule:
        lines.append(f"rule: {blocked.rule}")
    body = ("\n".join(lines) + "\n").encode("utf-8", "replace")
    phrase = _REASONS.get(blocked.status, "Error")
    head = (
        f"HTTP/1.1 {blocked.status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nX-Matchlock-Blocked: 1\r\n\r\n"
    )
    return head.encode() + body


class Proxy:
    def __init__(
        self,
        policy: Policy,
        secrets: SecretSet,
        ca: CertificateAuthority,
        audit_sink: AuditSink | None,
        upstream: Upstream,
        *,
        sandbox: str = "",
        sniff_wait: float = SNIFF_WAIT,
        idle_timeout: float = IDLE_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        hooks: Hooks | None = None,
    ) -> None:
        self.policy = policy
        self.hooks = hooks  # network hook rules (net/hookrun.py), applied per HTTP request
        self.secrets = secrets
        self.ca = ca
        self.upstream = upstream
        self.sandbox = sandbox
        self.sniff_wait = sniff_wait
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._audit = audit_sink
        self._streams: set[Stream] = set()
        # Tunnels (raw TCP, WebSocket after its upgrade) carry no requests to re-admit: they
        # are listed here so that an allow-list change can cut those it no longer allows.
        self._tunnels: dict[Stream, Tunnel] = {}
        self._active = 0
        self._refused = 0  # over the cap since the last audit event about it
        self._refused_reported = 0.0
        self._reaper: asyncio.Task[None] | None = None

    # -- audit ---------------------------------------------------------------------------

    def audit(self, event: AuditEvent) -> None:
        if self._audit is None:
            return
        event.sandbox = self.sandbox
        try:
            self._audit(event)
        except Exception as exc:  # a broken sink must not break traffic
            warn(log, "audit", "writing a network audit event failed", exc)

    def block_event(
        self, conn: Conn | Target, blocked: Blocked, protocol: str, method: str = "", path: str = ""
    ) -> None:
        target = conn.target if isinstance(conn, Conn) else conn
        host = (conn.name if isinstance(conn, Conn) else None) or target.name or target.address
        self.audit(
            AuditEvent(
                host=host,
                port=target.port,
                action="block",
                reason=blocked.reason,
                status=blocked.status,
                method=method,
                path=path,
                protocol=protocol,
            )
        )

    # -- connection entry ------------------------------------------------------------------

    async def handle(self, sock: socket.socket, target: Target) -> None:
        """Serve one accepted guest connection; never raises, always closes `sock`."""
        self._start_reaper()
        if self._active >= self.max_connections:
            self._refuse_over_cap(target)
            reset_socket(sock)
            return
        self._active += 1
        owned: list[Stream] = []  # once a transport owns the socket, close through it
        try:
            await self._handle(sock, target, owned)
        except Exception as exc:
            warn(log, "conn", f"proxy connection to {target.name or target.address}:"
                 f"{target.port} failed", exc)
        finally:
            self._active -= 1
            for stream in owned:
                if not stream.closed():
                    stream.abort()
            if not owned:
                reset_socket(sock)

    def _refuse_over_cap(self, target: Target) -> None:
        """One audit event per second at most: a guest looping on connect must not turn
        the cap into a flood of log lines."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_reported < 1.0:
            return
        reason = (
            f"too many connections: the sandbox has {self._active} open, its limit is "
            f"{self.max_connections} (--max-connections); {self._refused} refused"
        )
        self._refused, self._refused_reported = 0, now
        self.block_event(target, Blocked(0, reason), protocol="tcp")

    async def _handle(self, sock: socket.socket, target: Target, owned: list[Stream]) -> None:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if target.name is None:
            decision = self.policy.check_address(target.address, target.port)
        else:
            decision = self.policy.check(target.name, target.port)
        # Only a port the user named may carry raw TCP, so only there may a silent guest be
        # waiting for the server to speak first; elsewhere the first bytes must come.
        may_go_raw = decision.allowed and decision.raw
        # A denied connection that stays silent is reset after the short wait, as a raw one
        # would be: only a request line or ClientHello could still earn an explanation.
        peeked = await self._peek(sock, may_go_raw, quick_silence=not decision.allowed)
        if peeked is None:  # closed before sending anything
            sock.close()
            return
        first, kind, hello = peeked
        if not first and not decision.allowed:
            self.block_event(target, Blocked(0, decision.reason, decision.rule), protocol="tcp")
            reset_socket(sock)
        elif may_go_raw and (not first or (kind == "more" and first[0] != 0x16)):
            await relay_raw(self, sock, target, decision, owned, gate=True)
        elif kind == "tls":
            assert hello is not None
            await self._tls(sock, target, hello, decision, owned)
        elif kind in ("h2", "http"):
            await self._plain(sock, target, owned, h2=kind == "h2")
        elif kind == "raw":
            await relay_raw(self, sock, target, decision, owned, gate=False)
        elif first and first[0] == 0x16:
            # Still incomplete at the deadline: a slow ClientHello must not end up spliced.
            blocked = Blocked(0, "incomplete TLS ClientHello (timed out)")
            self._refuse_tls(sock, target, blocked, AlertDescription.DECODE_ERROR)
        else:
            what = "an incomplete first line" if first else "nothing"
            blocked = Blocked(
                0, f"the guest sent {what} within {HELLO_TIMEOUT:.0f} s (a request line or "
                f"ClientHello was expected on port {target.port})"
            )
            self.block_event(target, blocked, protocol="tcp")
            reset_socket(sock)

    async def _peek(
        self, sock: socket.socket, may_wait_for_server: bool, *, quick_silence: bool = False
    ) -> tuple[bytes, Kind, ClientHello | Invalid | None] | None:
        """The first bytes, left in the kernel, and what they are; None if the guest closed.

        b"" when the guest sends nothing: after `sniff_wait` if it `may_wait_for_server`
        (server-speaks-first protocols) or `quick_silence`, else after HELLO_TIMEOUT."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HELLO_TIMEOUT
        waited = False
        delay = 0.001
        seen, changed = 0, loop.time()
        while True:
            try:
                data = sock.recv(PEEK_SIZE, socket.MSG_PEEK)
            except BlockingIOError:
                if waited:  # spurious wake-up
                    await asyncio.sleep(delay)
                    continue
                quick = may_wait_for_server or quick_silence
                wait = self.sniff_wait if quick else HELLO_TIMEOUT
                if not await _readable(sock, wait):
                    return b"", "more", None
                waited = True
                continue
            except OSError:
                return None
            if not data:
                return None
            kind, hello = _classify(data)
            now = loop.time()
            if kind != "more" or now > deadline:
                return data, kind, hello
            if len(data) != seen:
                seen, changed = len(data), now
            elif may_wait_for_server and now - changed > self.sniff_wait and data[0] != 0x16:
                # A short message that cannot be told from the start of a request line yet
                # (`x`, `STAT`), and then silence: on a port named for raw TCP it goes on
                # under the raw guard, which refuses it the moment it turns into HTTP.
                return data, kind, hello
            # More of the ClientHello (or request line) is on its way: poll, since the
            # socket stays readable while the peeked bytes sit in it.
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    # -- TLS -------------------------------------------------------------------------------

    async def _tls(
        self,
        sock: socket.socket,
        target: Target,
        hello: ClientHello | Invalid,
        decision: Decision,
        owned: list[Stream],
    ) -> None:
        if isinstance(hello, Invalid):
            blocked = Blocked(0, f"malformed TLS ClientHello: {hello.reason}")
            return self._refuse_tls(sock, target, blocked, AlertDescription.DECODE_ERROR)
        sni = normalize_name(hello.sni) if hello.sni else None
        if hello.sni and sni is None:
            blocked = Blocked(0, f"invalid SNI {hello.sni!r}")
            return self._refuse_tls(sock, target, blocked, AlertDescription.UNRECOGNIZED_NAME)
        name = target.name
        if name is not None and sni is not None and sni != name:
            blocked = Blocked(
                0, f"TLS SNI {sni} does not match {name}, the name this connection was opened for"
            )
            return self._refuse_tls(sock, target, blocked, AlertDescription.UNRECOGNIZED_NAME)
        if name is None and decision.allowed and sni is not None:
            # Open mode, dialled by address: go by the SNI, resolved on the host. The address the
            # guest chose is ignored, so a secret only ever goes to a host resolved by us.
            name = sni
            decision = self.policy.check(name, target.port)
        if not decision.allowed:
            blocked = Blocked(0, decision.reason, decision.rule)
            return self._refuse_tls(sock, target, blocked, AlertDescription.ACCESS_DENIED)
        loop = asyncio.get_running_loop()
        ctx = self.ca.context_for(name or target.address)
        guest = Stream()
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: guest, sock, ssl=ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            reason = f"TLS handshake with the guest failed: {_ssl_reason(exc)}"
            self.block_event(target, Blocked(0, reason), protocol="tls")
            reset_socket(sock)
            return
        owned.append(guest)
        ssl_obj = transport.get_extra_info("ssl_object")
        alpn = ssl_obj.selected_alpn_protocol() if ssl_obj is not None else None
        conn = Conn(target, name, "h2" if alpn == "h2" else "https", tls=True)
        await self._serve_http(guest, conn)

    def _refuse_tls(
        self, sock: socket.socket, target: Target, blocked: Blocked, code: AlertDescription
    ) -> None:
        self.block_event(target, blocked, protocol="tls")
        # Consume what was only peeked: closing with unread bytes would send an RST that can
        # overtake the alert. Then FIN, so the guest reads the alert, not a reset.
        with contextlib.suppress(OSError):
            sock.recv(65536)
            sock.send(alert(code))
            sock.shutdown(socket.SHUT_WR)
        sock.close()

    # -- plain HTTP and raw TCP --------------------------------------------------------------

    async def _plain(
        self,
        sock: socket.socket,
        target: Target,
        owned: list[Stream],
        *,
        h2: bool,
    ) -> None:
        # A denied connection is still read up to its first request head: every request is
        # admitted on its own (admit() re-checks the policy), so the 403 names method and path.
        guest = await stream_from(sock)
        owned.append(guest)
        conn = Conn(target, target.name, "h2c" if h2 else "http", tls=False)
        await self._serve_http(guest, conn)

    async def _serve_http(self, guest: Stream, conn: Conn) -> None:
        self._streams.add(guest)
        try:
            if conn.protocol in ("h2", "h2c"):
                from matchlock.net.h2relay import H2Session

                await H2Session(self, guest, conn).run()
            else:
                from matchlock.net.http1relay import Http1Relay

                await Http1Relay(self, guest, conn).run()
        except (ConnectionError, OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self._streams.discard(guest)
            await guest.close()

    async def answer(
        self, guest: Stream, conn: Conn, blocked: Blocked, method: str = "", path: str = ""
    ) -> None:
        self.block_event(conn, blocked, conn.protocol, method, path)
        guest.write(response_for(blocked))
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            await guest.drain()
            # Lingering close: closing with unread input (a request body) makes the kernel send
            # an RST, which can destroy the response before the guest reads it.
            guest.write_eof()
            async with asyncio.timeout(LINGER):
                drained = 0
                while drained < LINGER_BYTES and (data := await guest.recv()):
                    drained += len(data)
        await guest.close()

    # -- request admission (shared by HTTP/1 and HTTP/2) ---------------------------------

    def admit(self, conn: Conn, authority: bytes, method: bytes) -> tuple[str, Decision] | Blocked:
        """Check one request: its authority against the connection's name, then the policy."""
        if method == b"CONNECT":
            return Blocked(
                403,
                "CONNECT is refused: the sandbox's network is transparent, connect to the host "
                "directly (proxy settings are not needed)",
            )
        try:
            host, port = http1.split_authority(authority)
        except HttpError as exc:
            return Blocked(400, exc.message)
        target = conn.target
        if port is not None and port != target.port:
            return Blocked(
                403, f"Host port {port} differs from the connection's port {target.port}"
            )
        if conn.name is not None:
            if host != conn.name:
                via = "TLS SNI" if conn.tls else "the name this connection was opened for"
                return Blocked(403, f"Host {host} does not match {via} ({conn.name})")
            decision = self.policy.check(conn.name, target.port)
            name = conn.name
        else:
            # Open mode, connection by address: dial the Host name (resolved on the host).
            decision = self.policy.check_address(target.address, target.port)
            if decision.allowed and normalize_name(host) is not None and not _is_ip(host):
                decision = self.policy.check(host, target.port)
            name = host
        if not decision.allowed:
            return Blocked(403, decision.reason, decision.rule)
        return name, decision

    async def open_upstream(self, name: str, conn: Conn, fresh: bool = False) -> Connection:
        target = conn.target
        dial_name: str | None = None if _is_ip(name) else name
        address = name if dial_name is None else target.address
        if not fresh:
            idle = self.upstream.take_idle(dial_name, address, target.port, conn.tls)
            if idle is not None:
                return idle
        return await self.upstream.connect(
            dial_name, address, target.port, tls=conn.tls, alpn=("http/1.1",) if conn.tls else ()
        )

    # -- tunnels and runtime policy changes -------------------------------------------------

    def tunnel_opened(self, guest: Stream, tunnel: Tunnel) -> bool:
        """Register a tunnel about to be spliced; False (and nothing registered) when the
        policy changed since it was admitted: an `allow-list delete` that ran meanwhile
        did not see it, so the check is made again here, on the loop thread, after which
        every later change sees it through `revoke`."""
        if self._revoked_because(tunnel) is not None:
            return False
        self._tunnels[guest] = tunnel
        return True

    def tunnel_closed(self, guest: Stream) -> None:
        self._tunnels.pop(guest, None)

    @contextlib.contextmanager
    def in_flight(self, guest: Stream, target: Target, name: str | None) -> Iterator[None]:
        """An HTTP exchange (request body and response) on `guest`, admitted just now (call
        it with no await since the admission): an allow-list delete meanwhile cuts it, so
        an endless request body or response cannot outlive its host's removal. An idle
        kept-alive connection is not in flight: its next request gets the 403."""
        self._tunnels[guest] = Tunnel(target, name, raw=False, upstream=None)
        try:
            yield
        finally:
            self._tunnels.pop(guest, None)

    def _revoked_because(self, t: Tunnel) -> str | None:
        if t.name is not None:
            decision = self.policy.check(t.name, t.target.port)
        else:
            decision = self.policy.check_address(t.target.address, t.target.port)
        if not decision.allowed:
            return f"allow-list changed: {decision.reason}"
        if t.raw and not decision.raw:
            return "allow-list changed: raw TCP is no longer allowed there"
        return None

    def revoke(self) -> int:
        """Cut every tunnel and HTTP exchange in flight that the policy no longer allows
        (after `allow-list delete`); runs on the loop thread. Idle HTTP connections need
        nothing: each request is admitted on its own. Returns how many were cut."""
        cut = 0
        for guest, t in list(self._tunnels.items()):
            why = self._revoked_because(t)
            if why is None:
                continue
            self._tunnels.pop(guest, None)
            self.block_event(t.target, Blocked(0, why), protocol="tcp" if t.raw else "websocket")
            guest.reset()
            if t.upstream is not None:
                t.upstream.abort()
            cut += 1
        return cut

    # -- housekeeping ----------------------------------------------------------------------

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        """Close guest connections idle between requests (or dribbling a head) too long."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(5.0, self.idle_timeout / 2))
            now = loop.time()
            for stream in list(self._streams):
                if stream.deadline and stream.deadline < now:
                    stream.abort()

    async def aclose(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for stream in list(self._streams):
            stream.abort()
        self.upstream.close_idle()


# -- socket helpers -----------------------------------------------------------------------


async def _readable(sock: socket.socket, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        async with asyncio.timeout(timeout):
            await fut
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(sock.fileno())


async def stream_from(sock: socket.socket) -> Stream:
    stream = Stream()
    await asyncio.get_running_loop().connect_accepted_socket(lambda: stream, sock)
    return stream


def reset_socket(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the guest sees 'connection refused/reset' at once."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _ssl_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc or type(exc).__name__)


# -- accept loop ----------------------------------------------------------------------------


async def serve(
    listener: socket.socket, proxy: Proxy, target_of: Callable[[socket.socket], Target]
) -> None:
    """Accept guest connections on an already bound, listening socket until cancelled."""
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    tasks: set[asyncio.Task[None]] = set()
    try:
        while True:
            sock, _ = await loop.sock_accept(listener)
            try:
                target = target_of(sock)
            except Exception as exc:
                warn(log, "target", "cannot tell where a guest connection was headed; refused", exc)
                reset_socket(sock)
                continue
            task = loop.create_task(proxy.handle(sock, target))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for task in tasks:
            task.cancel()
        await proxy.aclose()
