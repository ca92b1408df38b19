"""The sandbox's transparent egress proxy (docs/network.md, "The proxy").

Every guest TCP connection arrives here with the `Target` the plumbing learnt (the name the
guest resolved through the sandbox's DNS, the address and port it dialled). The proxy peeks at
the first bytes without consuming them (MSG_PEEK), so the kernel still holds the ClientHello
when the event loop's own TLS implementation takes over the socket:

- TLS: the SNI must equal the target's name and (name, port) must be allowed, *before* the
  handshake; otherwise a TLS alert and close. Then TLS with a leaf for the name, HTTP/1.1 or
  HTTP/2 as the guest offers (ALPN).
- Plain HTTP: the same per request, minus TLS.
- Anything else: spliced to name:port if the policy allows, else reset.

Per HTTP request: `Host`/`:authority` must equal the name, the policy is checked again (runtime
changes), placeholders are swapped for the secrets valid for that host (any other placeholder
→ 403), and one audit event is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from matchlock.net import http1
from matchlock.net.audit import AuditEvent, AuditSink
from matchlock.net.certs import CertificateAuthority
from matchlock.net.http1 import Framing, HttpError, Request, Response
from matchlock.net.policy import Decision, Policy, normalize_name
from matchlock.net.secrets import SecretLeak, SecretSet, ValueMask
from matchlock.net.streams import (
    IncompleteBody,
    Refused,
    Stream,
    Writer,
    copy_chunked,
    copy_length,
    copy_until_close,
    read_response,
    splice,
)
from matchlock.net.target import Target
from matchlock.net.tls_sniff import AlertDescription, ClientHello, Invalid, Sniff, alert, sniff
from matchlock.net.upstream import Connection, Upstream, UpstreamError

log = logging.getLogger(__name__)

SNIFF_WAIT = 0.25  # server-speaks-first protocols (SMTP, MySQL, …) get raw TCP after this
HELLO_TIMEOUT = 10.0  # to receive a whole ClientHello / first request line
HANDSHAKE_TIMEOUT = 10.0
HEAD_TIMEOUT = 30.0  # to receive a whole request head
IDLE_TIMEOUT = 300.0  # keep-alive connection idle between requests
MAX_CONNECTIONS = 2048
LINGER = 1.0  # after an error response, read and drop the guest's input this long at most
LINGER_BYTES = 1 << 20
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_FIRST_LINE = 8192
_REQUEST_LINE = re.compile(rb"[^ \r\n]+ [^ \r\n]+ HTTP/[0-9.]+")
# A prefix that could still become an HTTP request line ("GET /x HT…"); anything else
# without a line end yet is not HTTP.
_PARTIAL_REQUEST = re.compile(
    rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}"  # method
    rb"(?: [\x21-\x7e]*(?: (?:H(?:T(?:T(?:P(?:/[0-9.]*)?)?)?)?)?)?)?"  # target, "HTTP/1.1"
)

Kind = Literal["tls", "h2", "http", "raw", "more"]


def classify(data: bytes) -> Kind:
    """What a connection's first bytes are. "more": cannot tell yet.

    This decides what may be spliced raw, so it errs towards "not raw": anything that starts
    like a TLS record, or whose first line is an HTTP request line (any case, after stray
    CRLFs) is handled as such, since an origin would route it by SNI or Host, and a raw
    splice would let the guest pick another site on the same address (domain fronting).
    """
    return _classify(data)[0]


def _classify(data: bytes) -> tuple[Kind, ClientHello | Invalid | None]:
    """classify(), plus the parsed ClientHello for TLS (parsed once per connection)."""
    if not data:
        return "more", None
    if data[0] == 0x16:
        hello = sniff(data)
        if isinstance(hello, Sniff):
            return "more", None
        return "tls", hello
    if H2_PREFACE.startswith(data[: len(H2_PREFACE)]):
        return ("h2" if len(data) >= len(H2_PREFACE) else "more"), None
    line = data.lstrip(b"\r\n")
    if not line:
        return ("more" if len(data) < MAX_FIRST_LINE else "raw"), None
    end = line.find(b"\n")
    if end < 0:
        partial = len(line) < MAX_FIRST_LINE and _PARTIAL_REQUEST.fullmatch(line)
        return ("more" if partial else "raw"), None
    return ("http" if _REQUEST_LINE.fullmatch(line[:end].rstrip(b"\r")) else "raw"), None


_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
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
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.policy = policy
        self.secrets = secrets
        self.ca = ca
        self.upstream = upstream
        self.sandbox = sandbox
        self.sniff_wait = sniff_wait
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._audit = audit_sink
        self._streams: set[Stream] = set()
        self._active = 0
        self._reaper: asyncio.Task[None] | None = None

    # -- audit ---------------------------------------------------------------------------

    def audit(self, event: AuditEvent) -> None:
        if self._audit is None:
            return
        event.sandbox = self.sandbox
        try:
            self._audit(event)
        except Exception:  # a broken sink must not break traffic
            log.exception("audit sink failed")

    def _block_event(
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
            self._block_event(target, Blocked(0, "too many connections"), protocol="tcp")
            _reset(sock)
            return
        self._active += 1
        owned: list[Stream] = []  # once a transport owns the socket, close through it
        try:
            await self._handle(sock, target, owned)
        except Exception:
            log.exception("proxy connection to %s:%s failed", target.name, target.port)
        finally:
            self._active -= 1
            for stream in owned:
                if not stream.closed():
                    stream.abort()
            if not owned:
                _reset(sock)

    async def _handle(self, sock: socket.socket, target: Target, owned: list[Stream]) -> None:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if target.name is None:
            decision = self.policy.check_address(target.address, target.port)
        else:
            decision = self.policy.check(target.name, target.port)
        peeked = await self._peek(sock)
        if peeked is None:  # closed before sending anything
            sock.close()
            return
        first, kind, hello = peeked
        if not first:
            kind = "raw"  # silence: a server-speaks-first protocol
        if kind == "tls":
            assert hello is not None
            await self._tls(sock, target, hello, decision, owned)
        elif kind in ("h2", "http"):
            await self._plain(sock, target, owned, h2=kind == "h2")
        elif kind == "raw":
            await self._raw(sock, target, decision, owned, gate=not first)
        else:
            # Still incomplete at the deadline: a slow ClientHello or request line must not
            # end up spliced raw (the origin would route it by SNI/Host).
            blocked = Blocked(0, "incomplete TLS ClientHello or request line (timed out)")
            if first[0] == 0x16:
                self._refuse_tls(sock, target, blocked, AlertDescription.DECODE_ERROR)
            else:
                self._block_event(target, blocked, protocol="tcp")
                _reset(sock)

    async def _peek(
        self, sock: socket.socket
    ) -> tuple[bytes, Kind, ClientHello | Invalid | None] | None:
        """The first bytes, left in the kernel, and what they are; b"" if the guest waits
        for the server; None if it closed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HELLO_TIMEOUT
        waited = False
        delay = 0.001
        while True:
            try:
                data = sock.recv(16384 + 5, socket.MSG_PEEK)
            except BlockingIOError:
                if waited:  # spurious wake-up
                    await asyncio.sleep(delay)
                    continue
                if not await _readable(sock, self.sniff_wait):
                    return b"", "more", None
                waited = True
                continue
            except OSError:
                return None
            if not data:
                return None
            kind, hello = _classify(data)
            if kind != "more" or loop.time() > deadline:
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
            self._block_event(target, Blocked(0, reason), protocol="tls")
            _reset(sock)
            return
        owned.append(guest)
        ssl_obj = transport.get_extra_info("ssl_object")
        alpn = ssl_obj.selected_alpn_protocol() if ssl_obj is not None else None
        conn = Conn(target, name, "h2" if alpn == "h2" else "https", tls=True)
        await self._serve_http(guest, conn)

    def _refuse_tls(
        self, sock: socket.socket, target: Target, blocked: Blocked, code: AlertDescription
    ) -> None:
        self._block_event(target, blocked, protocol="tls")
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
        guest = await _stream_from(sock)
        owned.append(guest)
        conn = Conn(target, target.name, "h2c" if h2 else "http", tls=False)
        await self._serve_http(guest, conn)

    async def _raw(
        self,
        sock: socket.socket,
        target: Target,
        decision: Decision,
        owned: list[Stream],
        *,
        gate: bool,
    ) -> None:
        """Splice to name:port. `gate`: the guest was silent so far (server speaks first);
        its first bytes are checked when they come, since TLS or HTTP arriving only after
        the server spoke is an attempt to get past the SNI/Host checks."""
        if not decision.allowed:
            self._block_event(target, Blocked(0, decision.reason, decision.rule), protocol="tcp")
            _reset(sock)
            return
        started = time.perf_counter()
        try:
            up = await self.upstream.connect(target.name, target.address, target.port, tls=False)
        except UpstreamError as exc:
            self._block_event(target, Blocked(0, exc.message), protocol="tcp")
            _reset(sock)
            return
        guest = await _stream_from(sock)
        owned += (guest, up.stream)
        self.audit(
            AuditEvent(
                host=target.name or target.address,
                port=target.port,
                action="allow",
                reason=decision.reason,
                protocol="tcp",
            )
        )
        try:
            up_bytes, down_bytes = await splice(guest, up.stream, gate=_raw_gate if gate else None)
        except Refused as exc:
            self._block_event(target, Blocked(0, str(exc)), protocol="tcp")
            guest.reset()
            up.stream.reset()
            return
        await asyncio.gather(guest.close(), up.stream.close())
        self.audit(
            AuditEvent(
                host=target.name or target.address,
                port=target.port,
                action="allow",
                reason="connection closed",
                protocol="tcp",
                bytes_up=up_bytes,
                bytes_down=down_bytes,
                duration_ms=(time.perf_counter() - started) * 1000,
            )
        )

    async def _serve_http(self, guest: Stream, conn: Conn) -> None:
        self._streams.add(guest)
        try:
            if conn.protocol in ("h2", "h2c"):
                from matchlock.net.h2relay import H2Session

                await H2Session(self, guest, conn).run()
            else:
                await self._http1(guest, conn)
        except (ConnectionError, OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self._streams.discard(guest)
            await guest.close()

    async def _answer(
        self, guest: Stream, conn: Conn, blocked: Blocked, method: str = "", path: str = ""
    ) -> None:
        self._block_event(conn, blocked, conn.protocol, method, path)
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

    # -- HTTP/1.1 ------------------------------------------------------------------------

    async def _http1(self, guest: Stream, conn: Conn) -> None:
        loop = asyncio.get_running_loop()
        while True:
            guest.deadline = loop.time() + self.idle_timeout
            try:
                parsed = await _read_request(guest, loop)
            except HttpError as exc:
                await self._answer(guest, conn, Blocked(exc.status, exc.message))
                return
            if parsed is None:
                return
            guest.deadline = 0.0
            if not await self._exchange(guest, conn, parsed):
                return

    async def _exchange(self, guest: Stream, conn: Conn, req: Request) -> bool:
        """Forward one request and its response; True if the guest connection may go on."""
        started = time.perf_counter()
        path = req.path()
        method = req.method.decode("latin-1")
        admitted = self.admit(conn, req.host, req.method)
        if isinstance(admitted, Blocked):
            await self._answer(guest, conn, admitted, method=method, path=path)
            return False
        name, decision = admitted
        head = self.secrets.inject(req.serialize(), name)
        if isinstance(head, SecretLeak):
            blocked = Blocked(403, head.reason, f"--secret {head.secret_name}")
            await self._answer(guest, conn, blocked, method=method, path=path)
            return False
        has_body = req.framing is not Framing.NONE
        up: Connection | None = None
        resp: Response | None = None
        for attempt in (0, 1):
            try:
                up = await self.open_upstream(name, conn, fresh=attempt > 0)
            except UpstreamError as exc:
                status = 403 if exc.blocked else 502
                await self._answer(
                    guest, conn, Blocked(status, exc.message), method=method, path=path
                )
                return False
            up.stream.write(head)
            body_task = None
            if has_body:
                body_task = asyncio.ensure_future(_copy_request_body(guest, up.stream, req))
            try:
                resp = await _response_or_body_error(up.stream, req.method, guest, body_task)
            except HttpError as exc:
                _cancel(body_task)
                up.stream.abort()
                blocked = Blocked(exc.status, exc.message)
                await self._answer(guest, conn, blocked, method=method, path=path)
                return False
            except (ConnectionError, OSError, IncompleteBody):
                resp = None
            if resp is not None:
                break
            up.stream.abort()
            _cancel(body_task)
            if has_body or attempt:  # a body cannot be replayed: the guest must retry
                await self._answer(
                    guest,
                    conn,
                    Blocked(502, f"{name} closed the connection without a response"),
                    method=method,
                    path=path,
                )
                return False
        assert up is not None and resp is not None
        if resp.status == 101:
            return await self._upgrade(guest, conn, up, req, resp, name, started)
        close = not req.keep_alive or resp.framing is Framing.UNTIL_CLOSE
        down = 0
        try:
            down = await _send_response(guest, up.stream, resp, close, self.secrets.mask())
            up_bytes = 0
            if body_task is not None:
                if not body_task.done():  # the last write may still be draining
                    await asyncio.wait((body_task,), timeout=1.0)
                if not body_task.done():
                    # The origin answered before taking the whole body (an error, or a
                    # refused Expect: 100-continue): neither connection is in a known state.
                    raise IncompleteBody("response sent before the request body ended")
                up_bytes = body_task.result()
        except (HttpError, IncompleteBody, ConnectionError, OSError) as exc:
            _cancel(body_task)
            up.stream.abort()
            guest.abort()
            self.audit(
                AuditEvent(
                    host=name,
                    port=conn.target.port,
                    action="allow",
                    reason=f"aborted: {exc}",
                    method=method,
                    path=path,
                    status=resp.status,
                    bytes_down=down,
                    protocol=conn.protocol,
                    duration_ms=(time.perf_counter() - started) * 1000,
                )
            )
            return False
        if resp.keep_alive:
            self.upstream.put_idle(up)
        else:
            up.stream.abort()
        self.audit(
            AuditEvent(
                host=name,
                port=conn.target.port,
                action="allow",
                reason=decision.reason,
                method=method,
                path=path,
                status=resp.status,
                bytes_up=up_bytes,
                bytes_down=down,
                protocol=conn.protocol,
                duration_ms=(time.perf_counter() - started) * 1000,
            )
        )
        return not close

    async def _upgrade(
        self,
        guest: Stream,
        conn: Conn,
        up: Connection,
        req: Request,
        resp: Response,
        name: str,
        started: float,
    ) -> bool:
        if not req.websocket:
            up.stream.abort()
            await self._answer(
                guest,
                conn,
                Blocked(502, "unexpected 101 from upstream"),
                method=req.method.decode("latin-1"),
                path=req.path(),
            )
            return False
        guest.write(resp.head_for_guest(close=False))
        if up.stream.buf:  # frames the origin sent right after the 101
            guest.write(bytes(up.stream.buf))
            up.stream.buf.clear()
        if guest.buf:
            up.stream.write(bytes(guest.buf))
            guest.buf.clear()
        self.audit(
            AuditEvent(
                host=name,
                port=conn.target.port,
                action="allow",
                reason="websocket upgrade",
                method="GET",
                path=req.path(),
                status=101,
                protocol="websocket",
            )
        )
        up_bytes, down_bytes = await splice(guest, up.stream)
        self.audit(
            AuditEvent(
                host=name,
                port=conn.target.port,
                action="allow",
                reason="websocket closed",
                method="GET",
                path=req.path(),
                status=101,
                bytes_up=up_bytes,
                bytes_down=down_bytes,
                protocol="websocket",
                duration_ms=(time.perf_counter() - started) * 1000,
            )
        )
        return False

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


# -- HTTP/1 helpers -----------------------------------------------------------------------


async def _read_request(guest: Stream, loop: asyncio.AbstractEventLoop) -> Request | None:
    head_deadline = 0.0
    while True:
        if guest.buf:
            http1.skip_empty_lines(guest.buf)
            parsed = http1.parse_request(guest.buf)
            if parsed is not None:
                req, end = parsed
                del guest.buf[:end]
                return req
            if not head_deadline:  # a head has started: it gets HEAD_TIMEOUT, not the idle time
                head_deadline = guest.deadline = loop.time() + HEAD_TIMEOUT
        if not await guest.fill():
            if guest.buf:
                raise HttpError(400, "connection closed in the middle of a request head")
            return None


async def _response_or_body_error(
    up: Stream, method: bytes, guest: Stream, body_task: asyncio.Future[int] | None
) -> Response:
    """The response head, unless forwarding the request body fails first (a malformed
    chunked body, the guest gone): then the origin may wait for the rest forever."""
    if body_task is None:
        return await read_response(up, method, guest)
    resp_task = asyncio.ensure_future(read_response(up, method, guest))
    await asyncio.wait((resp_task, body_task), return_when=asyncio.FIRST_COMPLETED)
    if not resp_task.done() and body_task.exception() is not None:
        resp_task.cancel()
        exc = body_task.exception()
        if isinstance(exc, HttpError):
            raise HttpError(400, f"bad request body: {exc.message}")
        raise IncompleteBody(f"request body: {exc}")
    return await resp_task


class _Masked:
    """A Writer that redacts secret values on their way to the guest."""

    def __init__(self, stream: Stream, mask: ValueMask) -> None:
        self.stream = stream
        self.mask = mask

    def write(self, data: bytes | bytearray | memoryview) -> None:
        out = self.mask.feed(bytes(data))
        if out:
            self.stream.write(out)

    async def drain(self) -> None:
        await self.stream.drain()

    def finish(self) -> None:
        tail = self.mask.flush()
        if tail:
            self.stream.write(tail)


async def _send_response(
    guest: Stream, up: Stream, resp: Response, close: bool, mask: ValueMask | None = None
) -> int:
    head = resp.head_for_guest(close)
    if mask is not None:
        head = mask.all(head)
    framing = resp.framing
    if framing is Framing.NONE:
        guest.write(head)
        return 0
    if framing is Framing.LENGTH and len(up.buf) >= resp.content_length:
        # The common small response: one write, one TLS record.
        n = resp.content_length
        body = bytes(up.buf[:n])
        del up.buf[:n]
        guest.write(head + (mask.all(body) if mask is not None else body))
        return n
    guest.write(head)
    dst: Writer = guest if mask is None else _Masked(guest, mask)
    if framing is Framing.LENGTH:
        n = await copy_length(up, dst, resp.content_length)
    elif framing is Framing.CHUNKED:
        try:
            n = await copy_chunked(up, dst)
        except HttpError as exc:
            raise HttpError(502, f"bad chunked body from upstream: {exc.message}") from None
    else:
        n = await copy_until_close(up, dst)
    if isinstance(dst, _Masked):
        dst.finish()
    return n


async def _copy_request_body(guest: Stream, up: Stream, req: Request) -> int:
    if req.framing is Framing.LENGTH:
        return await copy_length(guest, up, req.content_length)
    return await copy_chunked(guest, up)


def _raw_gate(data: bytes) -> str | None:
    """For splice(): None = forward; "more" = need more bytes; else why to refuse."""
    kind = classify(data)
    if kind == "more":
        return "more"
    if kind == "raw":
        return None
    return f"{kind} sent after the server spoke first (would bypass the SNI/Host checks)"


def _cancel(task: asyncio.Future[int] | None) -> None:
    if task is not None and not task.done():
        task.cancel()


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


async def _stream_from(sock: socket.socket) -> Stream:
    stream = Stream()
    await asyncio.get_running_loop().connect_accepted_socket(lambda: stream, sock)
    return stream


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the guest sees 'connection refused/reset' at once."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _is_ip(host: str) -> bool:
    import ipaddress

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
            except Exception:
                log.exception("cannot tell where a guest connection was headed; refusing it")
                _reset(sock)
                continue
            task = loop.create_task(proxy.handle(sock, target))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for task in tasks:
            task.cancel()
        await proxy.aclose()
