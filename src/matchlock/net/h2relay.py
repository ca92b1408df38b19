"""HTTP/2 from the guest, relayed as HTTP/1.1 requests upstream (one pooled connection each).

The `h2` library does the HTTP/2 protocol work. Each guest stream goes through the same
admission as an HTTP/1 request (authority = name, policy, secrets) and is then sent upstream as
a canonical HTTP/1.1 request, so the request-smuggling defences of `http1` apply to it too:
header names and values are checked before they are serialized, since a CR or LF smuggled
through HPACK would otherwise split the HTTP/1.1 request.

Flow control is end to end: guest DATA is acknowledged only after it was written upstream, and
response data is sent only as the guest's window allows.

Memory per guest connection is bounded whatever the upstream's speed (a slow origin, a guest
that stops reading): at most CONNECTION_WINDOW bytes of request data not yet acknowledged,
and per stream (at most MAX_STREAMS) STREAM_BUFFER bytes queued towards the origin plus
STREAM_BUFFER bytes read from it and one transport read (READ_SIZE). With the values below:
4 MiB + 32 * (64 + 64 + 256) KiB = 16 MiB. `buffered()` reports the current figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from matchlock.net import http1
from matchlock.net.audit import AuditEvent
from matchlock.net.hookrun import (
    BodyTooLarge,
    body_chunks,
    hook_reason,
    response_headers,
    streamed_body,
    whole_body,
)
from matchlock.net.hooks import MAX_BODY, HookError, ResponsePlan
from matchlock.net.http1 import Framing, HttpError, Response
from matchlock.net.masking import ValueMask
from matchlock.net.proxy import Blocked  # proxy imports this module lazily: no cycle
from matchlock.net.secrets import SecretLeak
from matchlock.net.streams import READ_HIGH, IncompleteBody, Stream, read_response
from matchlock.net.upstream import Connection, UpstreamError

if TYPE_CHECKING:
    from matchlock.net.proxy import Conn, Proxy

_TOKEN = http1._METHOD
_DROP_REQUEST = frozenset({b"host", b"cookie"}) | http1.HOP_BY_HOP
_DROP_RESPONSE = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_BAD_VALUE = frozenset(b"\r\n\0")
MAX_STREAMS = 32
CONNECTION_WINDOW = 4 * 1024 * 1024
STREAM_BUFFER = 64 * 1024


class _StreamGone(Exception):
    pass


@dataclass(eq=False)
class _H2Stream:
    id: int
    body: asyncio.Queue[tuple[bytes, int] | None] = field(default_factory=asyncio.Queue)
    window: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    done: bool = False
    queued: int = 0  # request bytes in `body`, not yet written upstream
    upstream: Stream | None = None


class H2Session:
    def __init__(self, proxy: Proxy, guest: Stream, conn: Conn) -> None:
        self.proxy = proxy
        self.guest = guest
        self.conn = conn
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        self.streams: dict[int, _H2Stream] = {}
        self._in_flight = 0  # exchanges (streams admitted and not ended)

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.guest.write(data)

    async def run(self) -> None:
        self.h2.initiate_connection()
        self.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS})
        self.h2.increment_flow_control_window(CONNECTION_WINDOW)
        self.flush()
        loop = asyncio.get_running_loop()
        try:
            while True:
                # Idle (no stream open) connections are closed by the proxy's reaper.
                idle = self.proxy.idle_timeout
                self.guest.deadline = 0.0 if self.streams else loop.time() + idle
                data = await self.guest.read_some()
                if not data:
                    break
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError:
                    self.flush()  # the GOAWAY h2 queued
                    break
                for event in events:
                    if self._dispatch(event):
                        self.flush()
                        return
                self.flush()
                await self.guest.drain()
        finally:
            for st in self.streams.values():
                if st.task is not None:
                    st.task.cancel()

    def _dispatch(self, event: h2.events.Event) -> bool:
        """Handle one event; True when the connection is over."""
        if isinstance(event, h2.events.RequestReceived):
            new = _H2Stream(event.stream_id or 0)
            self.streams[new.id] = new
            ended = event.stream_ended is not None
            new.task = asyncio.ensure_future(self._request(new, list(event.headers or []), ended))
            return False
        stream_id = getattr(event, "stream_id", None) or 0
        st = self.streams.get(stream_id) if stream_id else None
        if isinstance(event, h2.events.DataReceived):
            if st is None or st.done:
                self._ack(event.flow_controlled_length or 0, stream_id)
            else:
                data = event.data or b""
                st.queued += len(data)
                st.body.put_nowait((data, event.flow_controlled_length or 0))
                if event.stream_ended is not None:
                    st.body.put_nowait(None)
        elif isinstance(event, h2.events.TrailersReceived):
            if st is not None:
                st.body.put_nowait(None)  # trailers are dropped (HTTP/1.1 upstream)
        elif isinstance(event, h2.events.StreamReset):
            self.streams.pop(stream_id, None)
            if st is not None and st.task is not None:
                st.task.cancel()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            for waiting in [st] if st is not None else list(self.streams.values()):
                waiting.window.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            return True
        return False

    def buffered(self) -> int:
        """Bytes this connection holds in memory for its streams (see the module doc)."""
        total = self.guest.unsent
        for st in self.streams.values():
            total += st.queued
            if st.upstream is not None:
                total += st.upstream.unsent + st.upstream.unread
        return total

    def _ack(self, size: int, stream_id: int) -> None:
        if size:
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.h2.acknowledge_received_data(size, stream_id)

    # -- exchanges in flight (an allow-list delete cuts the connection while one is) --------

    def _exchange_started(self) -> bool:
        from matchlock.net.proxy import Tunnel  # proxy imports this module lazily

        self._in_flight += 1
        if self._in_flight == 1:
            self.proxy.tunnel_opened(
                self.guest, Tunnel(self.conn.target, self.conn.name, raw=False, upstream=None))
        return True

    def _exchange_ended(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self.proxy.tunnel_closed(self.guest)

    # -- one request ---------------------------------------------------------------------

    async def _request(
        self, st: _H2Stream, headers: list[tuple[bytes, bytes]], ended: bool
    ) -> None:
        started = time.perf_counter()
        up: Connection | None = None
        method, path, status, up_bytes, down = "", "", 0, 0, 0
        name = self.conn.name or self.conn.target.address
        entered = False
        try:
            built = self._build(headers, ended)
            if isinstance(built, tuple):
                entered = self._exchange_started()  # no await since the admission
                req, name, reason = built
                method, path = req.method.decode("latin-1"), req.path()
                hooks, view, after_rules = self.proxy.hooks, None, []
                if hooks is not None:
                    # After the allow-list, before the secrets (as HTTP/1.1).
                    viewed = await hooks.before(req, name)
                    if isinstance(viewed, Blocked):
                        await self._block(st, name, viewed.status, viewed.reason, viewed.rule,
                                          method, path)
                        return
                    view = viewed
                    after_rules = hooks.prepare_after(view, req)
                up, resp, body_task = await self._send_upstream(st, req, name, ended)
                status = resp.status
                mask = self.proxy.secrets.mask()
                plan: ResponsePlan | None = None
                if hooks is not None and view is not None and after_rules:
                    planned = await hooks.after(view, after_rules, resp, mask)
                    if isinstance(planned, Blocked):
                        if body_task is not None:
                            body_task.cancel()
                        await self._block(st, name, planned.status, planned.reason,
                                          planned.rule, method, path)
                        return
                    plan = planned
                    reason = hook_reason(reason, view, plan)
                elif view is not None:
                    reason = hook_reason(reason, view)
                down = await self._respond(st, up, resp, mask, plan)
                if body_task is not None:
                    if not body_task.done():
                        await asyncio.wait((body_task,), timeout=1.0)
                    up_bytes = body_task.result() if body_task.done() else 0
                    if not body_task.done():
                        body_task.cancel()
                        resp.keep_alive = False
                if resp.keep_alive:
                    up.stream.read_high = READ_HIGH  # pooled: HTTP/1 may reuse it next
                    self.proxy.upstream.put_idle(up)
                else:
                    up.stream.abort()
                up = None
                self.proxy.audit(
                    AuditEvent(
                        host=name,
                        port=self.conn.target.port,
                        action="allow",
                        reason=reason,
                        method=method,
                        path=path,
                        status=status,
                        bytes_up=up_bytes,
                        bytes_down=down,
                        protocol=self.conn.protocol,
                        duration_ms=(time.perf_counter() - started) * 1000,
                    )
                )
                return
            blocked = built
            method, path = blocked.method, blocked.path
            await self._block(st, name, blocked.status, blocked.reason, blocked.rule, method, path)
        except UpstreamError as exc:
            code = 403 if exc.blocked else 502
            await self._block(st, name, code, exc.message, None, method, path)
        except BodyTooLarge as exc:
            reason = (f"a network hook needs the whole response body and it exceeds "
                      f"{MAX_BODY} bytes ({exc} bytes so far)")
            await self._block(st, name, 502, reason, None, method, path)
        except _StreamGone:
            pass
        except (HttpError, IncompleteBody, ConnectionError, OSError, HookError) as exc:
            self._reset(st, h2.errors.ErrorCodes.INTERNAL_ERROR)
            self.proxy.audit(
                AuditEvent(
                    host=name,
                    port=self.conn.target.port,
                    action="allow",
                    reason=f"aborted: {exc}",
                    method=method,
                    path=path,
                    status=status,
                    bytes_down=down,
                    protocol=self.conn.protocol,
                    duration_ms=(time.perf_counter() - started) * 1000,
                )
            )
        finally:
            if entered:
                self._exchange_ended()
            st.done = True
            if up is not None:
                up.stream.abort()
            self.streams.pop(st.id, None)
            # Acknowledge what the guest sent that we will never forward.
            while not st.body.empty():
                item = st.body.get_nowait()
                if item is not None:
                    self._ack(item[1], st.id)
            self.flush()

    def _build(
        self, headers: list[tuple[bytes, bytes]], ended: bool
    ) -> tuple[http1.Request, str, str] | _Refused:
        pseudo: dict[bytes, bytes] = {}
        fields: list[tuple[bytes, bytes]] = []
        host_header: bytes | None = None
        cookies: list[bytes] = []
        length: bytes | None = None
        for key, value in headers:
            if _BAD_VALUE.intersection(value) or _BAD_VALUE.intersection(key):
                return _Refused(400, "CR, LF or NUL in an HTTP/2 header")
            if key.startswith(b":"):
                pseudo[key] = value
                continue
            if not _TOKEN.fullmatch(key):
                return _Refused(400, "invalid HTTP/2 header name")
            if key == b"host":
                host_header = value
            elif key == b"cookie":
                cookies.append(value)
            elif key == b"content-length":
                length = value
            if key not in _DROP_REQUEST:
                fields.append((key, value))
        method = pseudo.get(b":method", b"")
        path = pseudo.get(b":path", b"")
        authority = pseudo.get(b":authority") or host_header or b""
        method_s, path_s = method.decode("latin-1"), path.split(b"?", 1)[0].decode("latin-1")
        if host_header is not None and host_header.lower() != authority.lower():
            return _Refused(400, "Host differs from :authority", method=method_s, path=path_s)
        if not _TOKEN.fullmatch(method) or not http1._TARGET.fullmatch(path or b"-"):
            return _Refused(400, "invalid :method or :path", method=method_s, path=path_s)
        origin_form = path.startswith(b"/") or (method == b"OPTIONS" and path == b"*")
        if not origin_form and method != b"CONNECT":
            return _Refused(400, "invalid :path", method=method_s, path=path_s)
        admitted = self.proxy.admit(self.conn, authority, method)
        if not isinstance(admitted, tuple):
            return _Refused(admitted.status, admitted.reason, admitted.rule, method_s, path_s)
        name, decision = admitted
        out: http1.Headers = [(b"host", authority)]
        if cookies:
            out.append((b"cookie", b"; ".join(cookies)))
        out += fields
        req = http1.Request(method, path, b"HTTP/1.1", out, authority)
        if length is not None:
            if not http1._DIGITS.fullmatch(length):
                return _Refused(400, "invalid content-length", method=method_s, path=path_s)
            req.content_length = int(length)
            req.framing = Framing.LENGTH if req.content_length else Framing.NONE
        elif not ended:
            req.framing = Framing.CHUNKED
        return req, name, decision.reason

    async def _send_upstream(
        self, st: _H2Stream, req: http1.Request, name: str, ended: bool
    ) -> tuple[Connection, Response, asyncio.Task[int] | None]:
        head = self.proxy.secrets.inject(req.serialize(), name)
        if isinstance(head, SecretLeak):
            raise _LeakError(head)
        for attempt in (0, 1):
            up = await self.proxy.open_upstream(name, self.conn, fresh=attempt > 0)
            up.stream.read_high = STREAM_BUFFER
            st.upstream = up.stream
            up.stream.write(head)
            body_task = None
            if req.framing is not Framing.NONE:
                chunked = req.framing is Framing.CHUNKED
                body_task = asyncio.ensure_future(self._pump_body(st, up.stream, chunked))
            try:
                resp = await read_response(up.stream, req.method, None)
                if resp.status == 101:
                    raise HttpError(502, "unexpected 101 from upstream")
                return up, resp, body_task
            except (ConnectionError, OSError, IncompleteBody):
                up.stream.abort()
                if body_task is not None or attempt:
                    if body_task is not None:
                        body_task.cancel()
                    raise UpstreamError(
                        f"{name} closed the connection without a response"
                    ) from None
        raise AssertionError("unreachable")

    async def _pump_body(self, st: _H2Stream, up: Stream, chunked: bool) -> int:
        total = 0
        while True:
            item = await st.body.get()
            if item is None:
                break
            data, flow = item
            st.queued -= len(data)
            if data:
                up.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                total += len(data)
                await up.drain_below(STREAM_BUFFER)
            self._ack(flow, st.id)
            self.flush()
        if chunked:
            up.write(b"0\r\n\r\n")
        return total

    async def _respond(self, st: _H2Stream, up: Connection, resp: Response,
                       mask: ValueMask | None, plan: ResponsePlan | None = None) -> int:
        headers = [(b":status", b"%d" % resp.status)]
        body: bytes | None = None  # a body the hooks made whole (buffered or set)
        chunks: AsyncIterator[bytes] = body_chunks(up.stream, resp)
        if plan is not None and plan.changed:
            fields = response_headers(plan, mask)
            if plan.body_changes and resp.framing is not Framing.NONE:
                if plan.buffered or plan.set_body is not None:
                    body = await whole_body(up.stream, resp, plan, mask)
                    fields.append((b"content-length", b"%d" % len(body)))
                    if plan.set_body is not None:
                        resp.keep_alive = False  # the origin's body was not read
                else:
                    pre = None if mask is None else mask.fresh()
                    chunks = streamed_body(up.stream, resp, plan, pre)
            else:
                fields += [(k, v) for k, v in resp.headers if k.lower() == b"content-length"]
        else:
            fields = [(key, mask.all(value) if mask is not None else value)
                      for key, value in resp.headers]
        headers += [(key.lower(), value) for key, value in fields
                    if key.lower() not in _DROP_RESPONSE]
        no_body = resp.framing is Framing.NONE
        if body is not None:
            try:
                self.h2.send_headers(st.id, headers, end_stream=not body)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                raise _StreamGone() from None
            self.flush()
            if body:
                await self._send(st, body)
                try:
                    self.h2.end_stream(st.id)
                except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                    raise _StreamGone() from None
                self.flush()
            return len(body)
        try:
            self.h2.send_headers(st.id, headers, end_stream=no_body)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            raise _StreamGone() from None
        self.flush()
        if no_body:
            return 0
        total = 0
        async for data in chunks:
            total += len(data)
            out = mask.feed(data) if mask is not None else data
            if out:
                await self._send(st, out)
        if mask is not None and (tail := mask.flush()):
            await self._send(st, tail)
        try:
            self.h2.end_stream(st.id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            raise _StreamGone() from None
        self.flush()
        return total

    async def _send(self, st: _H2Stream, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                window = min(
                    self.h2.local_flow_control_window(st.id), self.h2.max_outbound_frame_size
                )
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                raise _StreamGone() from None
            if window <= 0:
                st.window.clear()
                await st.window.wait()
                continue
            self.h2.send_data(st.id, bytes(view[:window]))
            view = view[window:]
            self.flush()
            await self.guest.drain()

    async def _block(self, st: _H2Stream, name: str, status: int, reason: str,
                     rule: str | None, method: str, path: str) -> None:
        """Answer the stream with the denial and record it."""
        await self._deny(st, status, reason, rule)
        self.proxy.audit(
            AuditEvent(
                host=name,
                port=self.conn.target.port,
                action="block",
                reason=reason,
                method=method,
                path=path,
                status=status,
                protocol=self.conn.protocol,
            )
        )

    async def _deny(self, st: _H2Stream, status: int, reason: str, rule: str | None) -> None:
        title = "blocked by the sandbox's egress policy" if status == 403 else "proxy error"
        lines = [f"matchlock: {title}", f"reason: {reason}"]
        if rule:
            lines.append(f"rule: {rule}")
        body = ("\n".join(lines) + "\n").encode()
        try:
            self.h2.send_headers(
                st.id,
                [
                    (b":status", b"%d" % status),
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", b"%d" % len(body)),
                    (b"x-matchlock-blocked", b"1"),
                ],
            )
            self.flush()
            await self._send(st, body)
            self.h2.end_stream(st.id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, _StreamGone):
            return
        self.flush()

    def _reset(self, st: _H2Stream, code: h2.errors.ErrorCodes) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.h2.reset_stream(st.id, code)
        self.flush()


@dataclass(slots=True)
class _Refused:
    status: int
    reason: str
    rule: str | None = None
    method: str = ""
    path: str = ""


class _LeakError(UpstreamError):
    def __init__(self, leak: SecretLeak) -> None:
        super().__init__(leak.reason, blocked=True)
