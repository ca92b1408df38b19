"""HTTP/1.1 from the guest: one request at a time, admitted, secrets swapped, relayed.

Every request is parsed strictly (`http1`), admitted by the proxy (Host = the connection's
name, policy), has its placeholders replaced for its host only, and is re-serialized in a
canonical form. Everything the origin sends back passes the secret mask (`masking`) on its
decoded payload: heads (1xx, 101 and final), length-delimited and close-delimited bodies as
they stream, chunked bodies re-chunked from their decoded data (a value split across chunks
is one value to the client), and WebSocket frames after an upgrade (`websocket`).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from matchlock.net import http1
from matchlock.net.audit import AuditEvent
from matchlock.net.hookrun import (
    BodyTooLarge,
    hook_reason,
    response_headers,
    streamed_body,
    whole_body,
)
from matchlock.net.hooks import MAX_BODY, HookError, RequestView, ResponsePlan, Rule
from matchlock.net.http1 import ChunkedReader, Framing, HttpError, Request, Response
from matchlock.net.masking import ValueMask
from matchlock.net.proxy import Blocked, Tunnel  # proxy imports this module lazily: no cycle
from matchlock.net.secrets import SecretLeak
from matchlock.net.streams import (
    IncompleteBody,
    Stream,
    Writer,
    copy_chunked,
    copy_length,
    copy_until_close,
    read_response,
)
from matchlock.net.upstream import Connection, UpstreamError
from matchlock.net.websocket import ServerFrameMask, WebSocketError

if TYPE_CHECKING:
    from matchlock.net.policy import Decision
    from matchlock.net.proxy import Conn, Proxy

HEAD_TIMEOUT = 30.0  # to receive a whole request head once it has started


class Http1Relay:
    """Serves one guest connection's HTTP/1.1 requests until either side ends it."""

    def __init__(self, proxy: Proxy, guest: Stream, conn: Conn) -> None:
        self.proxy = proxy
        self.guest = guest
        self.conn = conn

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.guest.deadline = loop.time() + self.proxy.idle_timeout
            try:
                parsed = await _read_request(self.guest, loop)
            except HttpError as exc:
                await self.proxy.answer(self.guest, self.conn, Blocked(exc.status, exc.message))
                return
            if parsed is None:
                return
            self.guest.deadline = 0.0
            if not await self._exchange(parsed):
                return

    async def _deny(self, status: int, reason: str, method: str, path: str,
                    rule: str | None = None) -> bool:
        await self.proxy.answer(self.guest, self.conn, Blocked(status, reason, rule), method, path)
        return False

    async def _exchange(self, req: Request) -> bool:
        """Forward one request and its response; True if the guest connection may go on."""
        proxy, guest, conn = self.proxy, self.guest, self.conn
        started = time.perf_counter()
        path = req.path()
        method = req.method.decode("latin-1")
        admitted = proxy.admit(conn, req.host, req.method)
        if isinstance(admitted, Blocked):
            await proxy.answer(guest, conn, admitted, method=method, path=path)
            return False
        name, decision = admitted
        # By name when the connection has one; else (open mode, by address) as admitted:
        # by address, so that ending open mode cuts it.
        with proxy.in_flight(guest, conn.target, conn.name):
            return await self._forward(req, name, decision, started, path, method)

    async def _forward(self, req: Request, name: str, decision: Decision, started: float,
                       path: str, method: str) -> bool:
        proxy, guest, conn = self.proxy, self.guest, self.conn
        view: RequestView | None = None
        after_rules: list[Rule] = []
        if proxy.hooks is not None:
            # After the allow-list, before the secrets: hooks see placeholders only, and the
            # mutated request meets the same secret scoping as the guest's own.
            viewed = await proxy.hooks.before(req, name)
            if isinstance(viewed, Blocked):
                await proxy.answer(guest, conn, viewed, method=method, path=path)
                return False
            view = viewed
            after_rules = proxy.hooks.prepare_after(view, req)
        head = proxy.secrets.inject(req.serialize(), name)
        if isinstance(head, SecretLeak):
            return await self._deny(403, head.reason, method, path, f"--secret {head.secret_name}")
        mask = proxy.secrets.mask()
        has_body = req.framing is not Framing.NONE
        up: Connection | None = None
        resp: Response | None = None
        body_task: asyncio.Future[int] | None = None
        for attempt in (0, 1):
            try:
                up = await proxy.open_upstream(name, conn, fresh=attempt > 0)
            except UpstreamError as exc:
                return await self._deny(403 if exc.blocked else 502, exc.message, method, path)
            up.stream.write(head)
            body_task = None
            if has_body:
                body_task = asyncio.ensure_future(_copy_request_body(guest, up.stream, req))
            try:
                resp = await _response_or_body_error(up.stream, req.method, guest, body_task, mask)
            except HttpError as exc:
                _cancel(body_task)
                up.stream.abort()
                return await self._deny(exc.status, exc.message, method, path)
            except (ConnectionError, OSError, IncompleteBody):
                resp = None
            if resp is not None:
                break
            up.stream.abort()
            _cancel(body_task)
            if has_body or attempt:  # a body cannot be replayed: the guest must retry
                reason = f"{name} closed the connection without a response"
                return await self._deny(502, reason, method, path)
        assert up is not None and resp is not None
        if resp.status == 101:
            return await self._upgrade(up, req, resp, name, started, mask)
        plan: ResponsePlan | None = None
        if after_rules and proxy.hooks is not None and view is not None:
            planned = await proxy.hooks.after(view, after_rules, resp, mask)
            if isinstance(planned, Blocked):
                _cancel(body_task)
                up.stream.abort()
                return await self._deny(planned.status, planned.reason, method, path,
                                        planned.rule)
            plan = planned
        close = not req.keep_alive or resp.framing is Framing.UNTIL_CLOSE
        if plan is not None and plan.body_changes and resp.framing is not Framing.NONE:
            # A streamed, rewritten body is re-chunked; an HTTP/1.0 guest gets it until close.
            close = close or (not plan.buffered and plan.set_body is None
                              and req.version != b"HTTP/1.1")
        down = 0
        event = AuditEvent(host=name, port=conn.target.port, action="allow",
                           reason=hook_reason(decision.reason, view, plan), method=method,
                           path=path, status=resp.status, protocol=conn.protocol)
        try:
            if plan is not None and plan.changed:
                down = await send_planned(guest, up.stream, resp, close, mask, plan)
            else:
                down = await send_response(guest, up.stream, resp, close, mask)
            if body_task is not None:
                if not body_task.done():  # the last write may still be draining
                    await asyncio.wait((body_task,), timeout=1.0)
                if not body_task.done():
                    # The origin answered before taking the whole body (an error, or a
                    # refused Expect: 100-continue): neither connection is in a known state.
                    raise IncompleteBody("response sent before the request body ended")
                event.bytes_up = body_task.result()
        except BodyTooLarge as exc:
            _cancel(body_task)
            up.stream.abort()
            reason = (f"a network hook needs the whole response body and it exceeds "
                      f"{MAX_BODY} bytes ({exc} bytes so far)")
            return await self._deny(502, reason, method, path)
        except (HttpError, IncompleteBody, ConnectionError, OSError, HookError) as exc:
            _cancel(body_task)
            up.stream.abort()
            guest.abort()
            event.reason = f"aborted: {exc}"
            close = True
        else:
            if plan is not None and plan.set_body is not None:
                up.stream.abort()  # the origin's body was not read
            elif resp.keep_alive:
                proxy.upstream.put_idle(up)
            else:
                up.stream.abort()
        event.bytes_down = down
        event.duration_ms = (time.perf_counter() - started) * 1000
        proxy.audit(event)
        return not close

    async def _upgrade(
        self,
        up: Connection,
        req: Request,
        resp: Response,
        name: str,
        started: float,
        mask: ValueMask | None,
    ) -> bool:
        proxy, guest, conn = self.proxy, self.guest, self.conn
        if not req.websocket:
            up.stream.abort()
            return await self._deny(502, "unexpected 101 from upstream", req.method.decode(
                "latin-1"), req.path())
        head = resp.head_for_guest(close=False)
        guest.write(head if mask is None else mask.all(head))
        frames = None
        if mask is not None:
            control = proxy.secrets.mask()
            assert control is not None
            frames = ServerFrameMask(mask, control)
        event = AuditEvent(host=name, port=conn.target.port, action="allow",
                           reason="websocket upgrade", method="GET", path=req.path(), status=101,
                           protocol="websocket")
        proxy.audit(event)
        tunnel = Tunnel(conn.target, conn.name, raw=False, upstream=up.stream)
        if not proxy.tunnel_opened(guest, tunnel):
            # The allow-list changed while the upgrade was on its way: the 101 already went
            # to the guest, so the connection can only be cut.
            up.stream.abort()
            guest.reset()
            return False
        try:
            up_bytes, down_bytes = await _relay_websocket(guest, up.stream, frames)
            event.reason = "websocket closed"
        except WebSocketError as exc:
            up_bytes = down_bytes = 0
            event.reason = f"websocket aborted: {exc}"
            up.stream.abort()
            guest.abort()
        finally:
            proxy.tunnel_closed(guest)
        event.bytes_up, event.bytes_down = up_bytes, down_bytes
        event.duration_ms = (time.perf_counter() - started) * 1000
        proxy.audit(event)
        return False


async def _relay_websocket(
    guest: Stream, up: Stream, frames: ServerFrameMask | None
) -> tuple[int, int]:
    """Bytes both ways until one side closes; origin→guest through `frames` when masking."""
    from matchlock.net.streams import splice

    if guest.buf:  # frames the guest pipelined behind its upgrade request
        up.write(bytes(guest.buf))
        guest.buf.clear()
    if frames is None:
        return await splice(guest, up)
    sent_up = asyncio.ensure_future(_pump_plain(guest, up))
    down = 0
    try:
        data = await up.read_some()  # frames the origin sent right behind the 101 come first
        while data:
            out = frames.feed(data)
            if out:
                guest.write(out)
                await guest.drain()
            down += len(data)
            data = await up.recv()
        tail = frames.finish()
        if tail:
            guest.write(tail)
    except (ConnectionError, OSError):
        pass
    finally:
        await asyncio.gather(guest.close(), up.close())
        sent_up.cancel()
    up_bytes = sent_up.result() if sent_up.done() and not sent_up.cancelled() else 0
    return up_bytes, down


async def _pump_plain(src: Stream, dst: Stream) -> int:
    try:
        return await copy_until_close(src, dst)
    except (ConnectionError, OSError):
        return 0
    finally:
        dst.abort()


# -- helpers (no proxy state) ----------------------------------------------------------------


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
    up: Stream,
    method: bytes,
    guest: Stream,
    body_task: asyncio.Future[int] | None,
    mask: ValueMask | None,
) -> Response:
    """The response head, unless forwarding the request body fails first (a malformed
    chunked body, the guest gone): then the origin may wait for the rest forever."""
    if body_task is None:
        return await read_response(up, method, guest, mask)
    resp_task = asyncio.ensure_future(read_response(up, method, guest, mask))
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


async def send_response(
    guest: Stream, up: Stream, resp: Response, close: bool, mask: ValueMask | None = None
) -> int:
    """Relay the response head and body to the guest; returns the body bytes read upstream."""
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
    if framing is Framing.CHUNKED:
        try:
            if mask is None:
                return await copy_chunked(up, guest)
            return await _rechunk_masked(up, guest, mask)
        except HttpError as exc:
            raise HttpError(502, f"bad chunked body from upstream: {exc.message}") from None
    dst: Writer = guest if mask is None else _Masked(guest, mask)
    if framing is Framing.LENGTH:
        n = await copy_length(up, dst, resp.content_length)
    else:
        n = await copy_until_close(up, dst)
    if isinstance(dst, _Masked):
        dst.finish()
    return n


async def send_planned(
    guest: Stream, up: Stream, resp: Response, close: bool, mask: ValueMask | None,
    plan: ResponsePlan,
) -> int:
    """A response the `after` hooks changed. Headers only: relayed as usual under the new
    head. A whole new body (set_body, replacements in a non-SSE body): buffered, with its
    Content-Length. Event-stream replacements: streamed line by line, re-chunked."""
    framing = [(k, v) for k, v in resp.headers
               if k.lower() in (b"content-length", b"transfer-encoding")]
    if not plan.body_changes or resp.framing is Framing.NONE:
        resp.headers = response_headers(plan, mask) + framing
        resp.has_hop_by_hop = True  # the head is rebuilt from `headers`
        return await send_response(guest, up, resp, close, mask)
    status_line = resp.raw[: resp.raw.index(b"\r\n") + 2]
    head = [status_line] + [b"%s: %s\r\n" % kv for kv in response_headers(plan, mask)]
    if close:
        head.append(b"Connection: close\r\n")
    if plan.buffered or plan.set_body is not None:
        body = await whole_body(up, resp, plan, mask)
        head.append(b"Content-Length: %d\r\n\r\n" % len(body))
        guest.write(b"".join(head) + body)
        await guest.drain()
        return len(body)
    chunked = not close
    if chunked:
        head.append(b"Transfer-Encoding: chunked\r\n")
    guest.write(b"".join(head) + b"\r\n")
    await guest.drain()
    total = 0
    pre = None if mask is None else mask.fresh()
    async for data in streamed_body(up, resp, plan, pre):
        total += len(data)
        out = mask.feed(data) if mask is not None else data
        if out:
            guest.write(b"%x\r\n%s\r\n" % (len(out), out) if chunked else out)
            await guest.drain()
    tail = mask.flush() if mask is not None else b""
    if tail:
        guest.write(b"%x\r\n%s\r\n" % (len(tail), tail) if chunked else tail)
    if chunked:
        guest.write(b"0\r\n\r\n")
    await guest.drain()
    return total


async def _rechunk_masked(up: Stream, guest: Stream, mask: ValueMask) -> int:
    """A chunked body, decoded, masked as one stream and sent as chunks of our own: the
    origin's chunk boundaries, extensions and trailers do not reach the guest (a value split
    across chunks, or echoed into a trailer, would otherwise pass)."""
    parser = ChunkedReader(decode=True)
    total = 0
    data = bytes(up.buf)
    up.buf.clear()
    while True:
        if data:
            used = parser.feed(data)
            total += used
            if used < len(data):
                up.buf += data[used:]
            payload = b"".join(parser.payload)
            parser.payload.clear()
            out = mask.feed(payload) if payload else b""
            if parser.done:
                out += mask.flush()
            if out:
                guest.write(b"%x\r\n%s\r\n" % (len(out), out))
            if parser.done:
                guest.write(b"0\r\n\r\n")
                await guest.drain()
                return total
            await guest.drain()
        data = await up.recv()
        if not data:
            raise IncompleteBody("closed before the end of a chunked body")


async def _copy_request_body(guest: Stream, up: Stream, req: Request) -> int:
    if req.framing is Framing.LENGTH:
        return await copy_length(guest, up, req.content_length)
    return await copy_chunked(guest, up)


def _cancel(task: asyncio.Future[int] | None) -> None:
    if task is not None and not task.done():
        task.cancel()
