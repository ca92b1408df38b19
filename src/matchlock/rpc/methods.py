"""The methods that run on a thread of their own: exec (buffered, stream, pipe, tty), files,
logs; and the `event` notification built from a proxy audit event."""

from __future__ import annotations

import base64
import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matchlock.errors import MatchlockError
from matchlock.guest.client import AgentGone, ChannelStalled, Exec, FileOpError, Output
from matchlock.rpc import config as cfg
from matchlock.rpc import protocol as proto
from matchlock.rpc.context import Ctx, FeedEnded, StdinFeed
from matchlock.rpc.protocol import RpcError
from matchlock.rpc.session import Session, file_info

if TYPE_CHECKING:
    from matchlock.rpc.server import Server

READ_FILE_LIMIT = 16 << 20
STREAM_CHUNK = 512 << 10  # raw bytes per read_file_stream.data notification (at most)
MAX_BUFFERED_OUTPUT = 64 << 20  # `exec` answers with all output at once: bounded
MAX_LOG = 16 << 20  # `log` answers with the last 16 MiB
LOG_POLL_S = 0.1


# --- exec ----------------------------------------------------


def _exec_error(ctx: Ctx, sess: Session, e: BaseException) -> RpcError:
    if ctx.cancelled.is_set():
        return RpcError(proto.CANCELLED, proto.CANCELLED_MESSAGE)
    if isinstance(e, AgentGone):
        return RpcError(proto.EXEC_FAILED, str(sess.sandbox.agent_failure(e)))
    return RpcError(proto.EXEC_FAILED, str(e))


def _kill(ex: Exec) -> Callable[[], None]:
    def kill() -> None:
        with contextlib.suppress(AgentGone):
            if ex.status is None:
                ex.kill()
    return kill


def _exec_common(server: Server, ctx: Ctx, mode: str) -> None:
    """exec (buffered), exec_stream, exec_pipe and exec_tty."""
    tty = mode == "exec_tty"
    spec = cfg.parse_exec(ctx.params, tty=tty)
    sess = server.need_session()
    interactive = mode in ("exec_pipe", "exec_tty")
    req = sess.exec_request(spec, stdin=interactive, tty=tty)
    t0 = time.monotonic()
    feed: StdinFeed | None = None
    try:
        ex = sess.exec(req)
    except (AgentGone, MatchlockError) as e:
        raise _exec_error(ctx, sess, e) from None
    ctx.on_cancel(_kill(ex))
    if interactive:
        assert ctx.id is not None
        feed = StdinFeed(ex, tty)
        server.feeds[ctx.id] = feed
        threading.Thread(target=feed.run, name="rpc-stdin", daemon=True).start()
        server.notify(f"{mode}.ready", {"id": ctx.id})
    out, err = bytearray(), bytearray()
    try:
        for ev in ex.events():
            if not isinstance(ev, Output):
                continue
            if mode == "exec":
                buf = out if ev.stream == "stdout" else err
                buf += ev.data
                if len(out) + len(err) > MAX_BUFFERED_OUTPUT:
                    _kill(ex)()
                    raise RpcError(proto.EXEC_FAILED, f"output exceeds {MAX_BUFFERED_OUTPUT} "
                                   "bytes; use exec_stream")
                continue
            stream = "stdout" if tty else ev.stream
            server.notify(f"{mode}.{stream}",
                          {"id": ctx.id, "data": base64.b64encode(ev.data).decode()})
    except (AgentGone, MatchlockError) as e:
        raise _exec_error(ctx, sess, e) from None
    finally:
        if feed is not None:
            feed.end()
            assert ctx.id is not None
            if server.feeds.get(ctx.id) is feed:
                del server.feeds[ctx.id]
    if ctx.cancelled.is_set():
        raise RpcError(proto.CANCELLED, proto.CANCELLED_MESSAGE)
    assert ex.status is not None
    duration = int((time.monotonic() - t0) * 1000)
    if mode == "exec":
        ctx.result({"duration_ms": duration, "exit_code": ex.status.code,
                    "stderr": base64.b64encode(err).decode(),
                    "stdout": base64.b64encode(out).decode()})
    else:
        ctx.result({"duration_ms": duration, "exit_code": ex.status.code})


def _file_call(ctx: Ctx, sess: Session, op: Callable[[], Any]) -> Any:
    try:
        return op()
    except (FileOpError, ChannelStalled) as e:  # stalled: this transfer only, not the guest
        raise RpcError(proto.FILE_FAILED, str(e)) from None
    except AgentGone as e:
        raise RpcError(proto.FILE_FAILED, str(sess.sandbox.agent_failure(e))) from None
    except MatchlockError as e:
        raise RpcError(proto.FILE_FAILED, str(e)) from None


def _limited_read(ctx: Ctx, sess: Session, op: Callable[[], Any], method: str,
                  limit: int | None, path: str) -> Any:
    """_file_call for a read bounded by `limit`: going past it fails with the reference's
    message for read_file."""
    try:
        return _file_call(ctx, sess, op)
    except RpcError as e:
        if limit is not None and "larger than" in e.message:
            raise RpcError(proto.FILE_FAILED, f"{method} exceeds {limit} bytes: {path}") from None
        raise


def _write_file(server: Server, ctx: Ctx) -> None:
    spec = cfg.parse_write(ctx.params)
    sess = server.need_session()
    _file_call(ctx, sess, lambda: sess.sandbox.conn.write_file(spec.path, spec.content,
                                                               spec.mode))
    _done(ctx, {})


def _read_file(server: Server, ctx: Ctx) -> None:
    path = cfg.parse_path(ctx.params)
    sess = server.need_session()
    data = _limited_read(ctx, sess, lambda: sess.sandbox.conn.read_file(path, READ_FILE_LIMIT),
                         "read_file", READ_FILE_LIMIT, path)
    _done(ctx, {"content": base64.b64encode(data).decode()})


# --- streamed files (extensions: this project's SDK; no size limit, no whole-file buffer) ---


_NO_DATA_CHANNEL = 'via "fd" needs the data channel (MATCHLOCK_RPC_DATA_FDS)'


def _read_file_stream(server: Server, ctx: Ctx) -> None:
    """`{path, limit?}` → `read_file_stream.data {id, data}` notifications (chunks of at most
    STREAM_CHUNK bytes, in order), then `{size}`. `limit`: fail (-32002) rather than send
    more than that many bytes (a guest file that grows, or a guest that lies)."""
    assert ctx.id is not None
    rid = ctx.id  # for the closures (mypy keeps the narrowing of a local only)
    path = cfg.parse_path(ctx.params)
    limit = cfg.parse_limit(ctx.params)
    via_fd = cfg.parse_via(ctx.params)
    if via_fd and server.data_broken:
        raise RpcError(proto.INVALID_PARAMS, _NO_DATA_CHANNEL)
    sess = server.need_session()
    total = 0
    buf = bytearray()

    def flush() -> None:
        if via_fd:
            server.data_write(rid, bytes(buf))
        else:
            server.notify("read_file_stream.data",
                          {"id": rid, "data": base64.b64encode(buf).decode()})
        buf.clear()

    def op() -> None:
        nonlocal total
        chunks = sess.sandbox.conn.read_file_chunks(path, limit)
        try:
            for chunk in chunks:
                if ctx.cancelled.is_set() or server.broken:
                    raise RpcError(proto.CANCELLED, proto.CANCELLED_MESSAGE)
                total += len(chunk)
                if via_fd:  # raw frames: no need to gather chunks
                    server.data_write(rid, chunk)
                    continue
                buf.extend(chunk)
                if len(buf) >= STREAM_CHUNK:
                    flush()
        finally:
            chunks.close()  # a consumer that stops early ends the guest's read (KILL)

    _limited_read(ctx, sess, op, "read_file_stream", limit, path)
    if buf:
        flush()
    if via_fd and not ctx.cancelled.is_set():
        server.data_write(rid, b"")  # the SDK has all the content before the result
    _done(ctx, {"size": total})


def _write_file_stream(server: Server, ctx: Ctx) -> None:
    """`{path, mode?}`; the content follows as `write_file_stream.data {id, data}` and
    `write_file_stream.end {id}` (queued by the read loop into the feed registered for this
    request before it started); → `{size}` once the guest renamed the file into place."""
    assert ctx.id is not None
    feed = server.file_feeds[ctx.id]
    try:
        path = cfg.parse_path(ctx.params)
        mode = cfg.parse_mode(ctx.params)
        feed.via_fd = cfg.parse_via(ctx.params)
        if feed.via_fd and server.data_broken:
            raise RpcError(proto.INVALID_PARAMS, _NO_DATA_CHANNEL)
        sess = server.need_session()
        ctx.on_cancel(feed.end)
        if feed.via_fd:  # the content is on another pipe: it may come once we listen
            server.notify("write_file_stream.ready", {"id": ctx.id})

        def op() -> int:
            try:
                return sess.sandbox.conn.write_file_chunks(path, feed.chunks(ctx.cancelled),
                                                           mode)
            except FeedEnded:
                if feed.failure and not ctx.cancelled.is_set():
                    raise RpcError(proto.INVALID_PARAMS, feed.failure) from None
                raise RpcError(proto.CANCELLED, proto.CANCELLED_MESSAGE) from None

        size = _file_call(ctx, sess, op)
    finally:
        feed.end()
        server.file_feeds.pop(ctx.id, None)
    _done(ctx, {"size": size})


def _list_files(server: Server, ctx: Ctx) -> None:
    path = cfg.parse_path(ctx.params)
    sess = server.need_session()
    entries = _file_call(ctx, sess, lambda: sess.sandbox.conn.list_files(path))
    files = [file_info(e) for e in sorted(entries, key=lambda e: e.name)]
    _done(ctx, {"files": files})


def _done(ctx: Ctx, result: dict[str, Any]) -> None:
    if ctx.cancelled.is_set():
        raise RpcError(proto.CANCELLED, proto.CANCELLED_MESSAGE)
    ctx.result(result)


def _log_paths(server: Server) -> list[Path]:
    """The VM's console, then its entrypoint's output (the reference's vm.log holds both);
    still there after `close`."""
    sess = server.session
    if sess is None or sess.sandbox.dir is None:
        raise RpcError(proto.VM_FAILED, "VM not created")
    from matchlock.rpc.session import ENTRYPOINT_LOG

    return [sess.sandbox.dir / "console.log", sess.sandbox.dir / ENTRYPOINT_LOG]


def _log(server: Server, ctx: Ctx) -> None:
    data = bytearray()
    for path in _log_paths(server):
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - MAX_LOG))
            data += f.read(MAX_LOG)
    _done(ctx, {"content": base64.b64encode(bytes(data[-MAX_LOG:])).decode()})


def _log_stream(server: Server, ctx: Ctx) -> None:
    """What the logs hold, then what is appended, every 100 ms, until cancelled."""
    offsets = dict.fromkeys(_log_paths(server), 0)
    while True:
        for path, offset in offsets.items():
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read(64 << 10)
            except FileNotFoundError:
                continue
            if chunk:
                offsets[path] = offset + len(chunk)
                server.notify("log_stream.data",
                              {"id": ctx.id, "data": base64.b64encode(chunk).decode()})
        if ctx.cancelled.wait(LOG_POLL_S) or server.broken:
            break
    raise RpcError(proto.CANCELLED, proto.CANCELLED_MESSAGE)


def _allow_list(server: Server, ctx: Ctx, add: bool) -> None:
    hosts = cfg.parse_hosts(ctx.params)
    sandbox = server.need_session().sandbox
    if sandbox.opts.egress is None:
        raise RpcError(proto.VM_FAILED, "allow-list updates unavailable: sandbox was started "
                                        "without network interception")
    try:
        changed = sandbox.allow_list_add(hosts) if add else sandbox.allow_list_delete(hosts)
    except MatchlockError as e:  # a pattern the policy's parser refuses
        raise RpcError(proto.INVALID_PARAMS, str(e)) from None
    _done(ctx, {"added" if add else "removed": changed,
                "allowed_hosts": sandbox.allow_list() or None})


def _port_forward(server: Server, ctx: Ctx) -> None:
    """Listeners that replace the previous set and live until the next port_forward, close or
    the end of the session (not of this request)."""
    from matchlock.sandbox.ports import PortSpec

    spec = cfg.parse_port_forward(ctx.params)
    sess = server.need_session()
    with sess.forward_lock:
        if sess.forwarder is not None:
            sess.forwarder.close()
            sess.forwarder = None
        addresses = ["127.0.0.1" if a == "localhost" else a for a in spec.addresses]
        try:
            fw = sess.sandbox.publish([PortSpec(lo, re) for lo, re in spec.forwards], addresses)
        except MatchlockError as e:
            raise RpcError(proto.VM_FAILED, str(e)) from None
        sess.forwarder = fw
    _done(ctx, {"bindings": [{"address": b.address, "local_port": b.local_port,
                              "remote_port": b.remote_port} for b in fw.bindings]})


HANDLERS: dict[str, Callable[[Server, Ctx], None]] = {
    "allow_list_add": lambda s, c: _allow_list(s, c, True),
    "allow_list_delete": lambda s, c: _allow_list(s, c, False),
    "port_forward": _port_forward,
    "log": _log,
    "log_stream": _log_stream,
    "exec": lambda s, c: _exec_common(s, c, "exec"),
    "exec_stream": lambda s, c: _exec_common(s, c, "exec_stream"),
    "exec_pipe": lambda s, c: _exec_common(s, c, "exec_pipe"),
    "exec_tty": lambda s, c: _exec_common(s, c, "exec_tty"),
    "write_file": _write_file,
    "read_file": _read_file,
    "list_files": _list_files,
    "read_file_stream": _read_file_stream,
    "write_file_stream": _write_file_stream,
}


# --- events ------------------------------------------------------------------------------------


def network_event(ev: Any) -> dict[str, Any]:
    """An audit event as the reference's `event` notification (type network)."""
    d = ev.as_dict()
    scheme = "https" if d["protocol"] in ("https", "h2", "tls") else "http"
    net: dict[str, Any] = {
        "method": d["method"],
        "url": f"{scheme}://{d['host']}{d['path']}" if d["path"] else "",
        "host": d["host"],
        "status_code": d["status"],
        "request_bytes": d["bytes_up"],
        "response_bytes": d["bytes_down"],
        "duration_ms": int(d["duration_ms"]),
        "blocked": d["action"] == "block",
    }
    if d["action"] == "block":
        net["block_reason"] = d["reason"]
    net["port"] = d["port"]
    net["protocol"] = d["protocol"]
    return {"type": "network", "timestamp": int(d["time"]), "network": net}
