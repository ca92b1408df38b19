"""`matchlock rpc`: JSON-RPC 2.0 on stdin/stdout driving one sandbox (docs/rpc.md).

Concurrency, as the reference's handler:
- `cancel` is handled on the read loop at once;
- `create` and `close` run on the read loop after the requests in flight have finished
  (`close` waits at most its `timeout_seconds`, then cancels what is left);
- `*.stdin`, `*.stdin_eof` and `exec_tty.resize` are handled on the read loop, in order, and
  never answered (stdin is queued to a per-exec feeder, so a process that does not read its
  stdin cannot stall the loop);
- every other request runs on a thread of its own, cancellable by its id.

The process owns the sandbox: at stdin EOF or a signal it cancels what runs and removes the
sandbox completely; after `close` the sandbox is kept as `stopped` for `matchlock rm` (what the
SDK's `remove()` runs). If the process is SIGKILLed, the VMM dies with it (architecture.md)
and a reaper process removes the rest (rpc/reaper.py).
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from types import FrameType
from typing import Any

from matchlock.errors import MatchlockError
from matchlock.guest.client import AgentGone
from matchlock.rpc import config as cfg
from matchlock.rpc import datachan
from matchlock.rpc import protocol as proto
from matchlock.rpc.context import Ctx, FileFeed, StdinFeed
from matchlock.rpc.methods import HANDLERS, network_event
from matchlock.rpc.protocol import RpcError
from matchlock.rpc.session import Session

READ_CHUNK = 1 << 20
SHUTDOWN_WAIT_S = 10.0
EVENT_QUEUE = 100

_STDIN = {"exec_pipe.stdin": False, "exec_tty.stdin": True}
_STDIN_EOF = {"exec_pipe.stdin_eof": False, "exec_tty.stdin_eof": True}
_NEED_ID = ("exec_pipe", "exec_tty", "log_stream", "read_file_stream", "write_file_stream")
_FILE_DATA = ("write_file_stream.data", "write_file_stream.end")
_EOF = object()
_EXPIRED = object()  # resources.timeout_seconds ran out

class Server:
    def __init__(self, rfd: int, wfd: int, data_fds: tuple[int, int] | None = None) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self._wlock = threading.Lock()
        # The SDK's binary data channel (rpc/datachan.py), when it gave us one.
        self.data_fds = data_fds
        self._dlock = threading.Lock()
        self.data_broken = data_fds is None
        self.broken = False  # stdout failed: stop
        self.session: Session | None = None
        self.closed = False
        self._closed_why = "VM closed"
        self._booting = False
        self._inflight: dict[int, Ctx] = {}
        self._active = 0
        self._cond = threading.Condition()
        self.feeds: dict[int, StdinFeed] = {}
        self.file_feeds: dict[int, FileFeed] = {}
        self._signal: int | None = None
        self._events: queue.Queue[dict[str, Any]] = queue.Queue(EVENT_QUEUE)
        # Lines of up to 10 MiB wait here while the loop is busy (a boot): few of them.
        self._lines: queue.Queue[object] = queue.Queue(8)
        self._signalled = threading.Event()
        self._reaper: subprocess.Popen[bytes] | None = None
        self._reaper_fd: int | None = None
        self._timer: threading.Timer | None = None

    # --- output ---------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        with self._wlock:
            if self.broken:
                return
            try:
                view = memoryview(data)
                while view:
                    n = os.write(self.wfd, view)
                    view = view[n:]
            except OSError:
                self.broken = True

    def notify(self, method: str, params: dict[str, Any]) -> None:
        self.write(proto.encode_notification(method, params))

    def data_write(self, req_id: int, data: bytes) -> None:
        """One frame of a transfer's content on the data channel (b"": its end)."""
        assert self.data_fds is not None
        with self._dlock:
            if self.data_broken:
                raise RpcError(proto.FILE_FAILED, "the data channel is closed")
            try:
                datachan.write_frame(self.data_fds[1], req_id, data)
            except OSError:
                self.data_broken = True
                raise RpcError(proto.FILE_FAILED, "the data channel is closed") from None

    def _read_data(self) -> None:
        """Content of write_file_stream requests made with `"via": "fd"`, routed to their
        feeds in order. A broken frame closes the channel and fails what was using it."""
        assert self.data_fds is not None
        why = ""
        try:
            while (frame := datachan.read_frame(self.data_fds[0])) is not None:
                req_id, data = frame
                feed = self.file_feeds.get(req_id)
                if feed is not None:
                    feed.put(data or None)
        except (datachan.DataChannelError, OSError) as e:
            why = f"data channel: {e}"
        with self._dlock:
            self.data_broken = True
        for feed in list(self.file_feeds.values()):
            if feed.via_fd:
                feed.end(why or "the data channel was closed")

    # --- the loop -------------------------------------------------------------------------

    def serve(self) -> int:
        for s in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, self._on_signal)
        # A Ctrl-C in the SDK's terminal reaches this process too (same process group): the
        # SDK decides (its `close`, or the end of its stdin, ends the session). A handler
        # rather than SIG_IGN, which children (the VMM) would inherit.
        signal.signal(signal.SIGINT, _ignore)
        threading.Thread(target=self._read, name="rpc-read", daemon=True).start()
        threading.Thread(target=self._watch, name="rpc-watch", daemon=True).start()
        threading.Thread(target=self._pump_events, name="rpc-events", daemon=True).start()
        if self.data_fds is not None:
            threading.Thread(target=self._read_data, name="rpc-data", daemon=True).start()
        reason = "stdin closed"
        while True:
            if self._signal is not None:
                reason = f"stopped by {signal.Signals(self._signal).name}"
                break
            if self.broken:
                reason = "stdout closed"
                break
            try:
                item = self._lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _EOF:
                break
            if item is _EXPIRED:
                self._expire()
                continue
            if isinstance(item, proto.TooLong):
                self.write(proto.too_long_error(item.prefix))
                continue
            assert isinstance(item, bytes)
            if proto.is_blank(item):
                continue
            req = proto.parse_line(item)
            if isinstance(req, bytes):
                self.write(req)
                continue
            try:
                self._dispatch(req)
            except Exception as e:  # a bug must not end the session (or print on stdout)
                traceback.print_exc(file=sys.stderr)
                self.write(proto.encode_error(req.id, proto.INTERNAL, f"internal error: {e}"))
        self._shutdown(reason)
        return 0

    def _read(self) -> None:
        splitter = proto.LineSplitter()
        while True:
            try:
                data = os.read(self.rfd, READ_CHUNK)
            except OSError:
                data = b""
            items = splitter.feed(data) if data else splitter.finish()
            for item in items:
                self._lines.put(item)
            if not data:
                self._lines.put(_EOF)
                return

    def _on_signal(self, signo: int, frame: FrameType | None) -> None:
        # Only record (this may interrupt the main thread anywhere); the loop and the
        # watcher act on it.
        if self._signal is None:
            self._signal = signo
            # Safe here: only the watcher ever waits on this event.
            self._signalled.set()

    def _watch(self) -> None:
        """A signal while the sandbox boots stops the boot (the read loop is busy in it)."""
        self._signalled.wait()
        assert self._signal is not None
        while not self.closed:
            sess = self.session
            if self._booting and sess is not None:
                sess.sandbox.abort(f"stopped by {signal.Signals(self._signal).name}")
                return
            time.sleep(0.05)

    def _pump_events(self) -> None:
        while True:
            params = self._events.get()
            self.write(proto.encode_notification("event", params, sort=False))

    def on_audit(self, ev: Any) -> None:
        """Audit events from the proxy (its own thread) → `event` notifications; dropped
        when the client does not keep up, as the reference's bounded channel."""
        with contextlib.suppress(queue.Full):
            self._events.put_nowait(network_event(ev))

    # --- dispatch -------------------------------------------------------------------------

    def _dispatch(self, req: proto.Request) -> None:
        m = req.method
        if m == "cancel":
            self._cancel(req)
        elif m in _SERIAL:
            ctx = Ctx(self.write, req)
            try:
                _SERIAL[m](self, ctx)
            except RpcError as e:
                ctx.error(e.code, e.message)
        elif m in _STDIN or m in _STDIN_EOF:
            self._stdin(req)
        elif m in _FILE_DATA:
            self._file_data(req)
        elif m == "exec_tty.resize":
            self._resize(req)
        elif m in HANDLERS:
            if m in _NEED_ID and req.id is None:
                self.write(proto.encode_error(None, proto.INVALID_REQUEST,
                                              f"{m} requires a request id"))
                return
            ctx = Ctx(self.write, req)
            with self._cond:
                if req.id is not None and req.id in self._inflight:
                    ctx.error(proto.INVALID_REQUEST, f"request id {req.id} is already in flight")
                    return
                if req.id is not None:
                    self._inflight[req.id] = ctx
                    if m == "write_file_stream":
                        # Before the thread starts: the content lines that follow this
                        # request on the read loop must find their queue.
                        self.file_feeds[req.id] = FileFeed()
                self._active += 1
            threading.Thread(target=self._run, args=(ctx,), name=f"rpc-{m}",
                             daemon=True).start()
        else:
            self.write(proto.encode_error(req.id, proto.METHOD_NOT_FOUND, "Method not found"))

    def _run(self, ctx: Ctx) -> None:
        try:
            HANDLERS[ctx.method](self, ctx)
        except RpcError as e:
            ctx.error(proto.CANCELLED if ctx.cancelled.is_set() else e.code,
                      proto.CANCELLED_MESSAGE if ctx.cancelled.is_set() else e.message)
        except Exception as e:  # never a traceback on stdout; the request fails
            traceback.print_exc(file=sys.stderr)
            ctx.error(proto.INTERNAL, f"internal error: {e}")
        finally:
            with self._cond:
                if ctx.id is not None and self._inflight.get(ctx.id) is ctx:
                    del self._inflight[ctx.id]
                self._active -= 1
                self._cond.notify_all()

    def _wait_idle(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._active:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _cancel_all(self) -> None:
        with self._cond:
            ctxs = list(self._inflight.values())
        for ctx in ctxs:
            ctx.cancel()

    def _cancel(self, req: proto.Request) -> None:
        try:
            target = cfg.parse_target(req.params)
        except RpcError as e:
            self.write(proto.encode_error(req.id, e.code, e.message))
            return
        with self._cond:
            ctx = self._inflight.get(target)
        self.write(proto.encode_result(req.id, {"cancelled": ctx is not None}))
        if ctx is not None:
            ctx.cancel()

    def _stdin(self, req: proto.Request) -> None:
        # Never answered; a bad payload or an unknown id is ignored (the reference's rule).
        try:
            target = cfg.parse_target(req.params)
            data = None if req.method in _STDIN_EOF else cfg.parse_data(req.params)
        except RpcError:
            return
        feed = self.feeds.get(target)
        tty = _STDIN.get(req.method, _STDIN_EOF.get(req.method))
        if feed is None or feed.tty != tty:
            return
        if data is None or data:
            feed.put(data)

    def _file_data(self, req: proto.Request) -> None:
        # Never answered, as stdin; an unknown id is ignored. Bad content fails the transfer
        # (its request answers -32602): a file must never be written with a chunk missing.
        try:
            target = cfg.parse_target(req.params)
        except RpcError:
            return
        feed = self.file_feeds.get(target)
        if feed is None:
            return
        try:
            data = cfg.parse_data(req.params) if req.method.endswith(".data") else None
        except RpcError as e:
            feed.end(e.message)
            return
        if data is None or data:
            feed.put(data)

    def _resize(self, req: proto.Request) -> None:
        try:
            target = cfg.parse_target(req.params)
            rows, cols = cfg.parse_resize(req.params)
        except RpcError:
            return
        feed = self.feeds.get(target)
        if feed is not None and feed.tty:
            with contextlib.suppress(AgentGone):
                feed.ex.resize(rows, cols)

    def need_session(self) -> Session:
        if self.closed:
            raise RpcError(proto.VM_FAILED, self._closed_why)
        if self.session is None or self._booting:
            raise RpcError(proto.VM_FAILED, "VM not created")
        return self.session

    # --- create / close -------------------------------------------------------------------

    def _create(self, ctx: Ctx) -> None:
        if self.closed or self.session is not None:
            raise RpcError(proto.VM_FAILED, "this rpc process already created its sandbox "
                           "(one per process: start another `matchlock rpc`)")
        spec = cfg.parse_create(ctx.params)
        self._wait_idle(None)
        sess = Session.prepare(spec, self.on_audit)
        self._start_reaper()
        self.session = sess
        self._booting = True
        try:
            sess.sandbox.start()
            sess.finish_start()
        except BaseException as e:
            if isinstance(e, AgentGone):
                msg = str(sess.sandbox.agent_failure(e))
            elif isinstance(e, MatchlockError | OSError):
                msg = str(e)
            else:
                traceback.print_exc(file=sys.stderr)
                msg = f"internal error: {e}"
            if self._signal is not None:
                msg = f"the sandbox was stopped: stopped by {signal.Signals(self._signal).name}"
            sess.sandbox.opts.keep_dir = False
            sess.stop_entrypoint()
            sess.sandbox.close()
            self.session = None
            self.closed = False
            raise RpcError(proto.VM_FAILED, msg) from None
        finally:
            self._booting = False
        self._start_timer(spec.timeout_seconds)
        ctx.result({"id": sess.sandbox.id})

    def _start_timer(self, seconds: float) -> None:
        if seconds > 0:
            # Enforced (the reference only stores it): the sandbox stops, as by `close`.
            self._timer = threading.Timer(seconds, self._lines.put, (_EXPIRED,))
            self._timer.daemon = True
            self._timer.start()

    # --- pause / resume (extension: warm pools, docs/sdk.md) -------------------------------

    def _pause(self, ctx: Ctx) -> None:
        """Stop the guest's vCPUs. Refused while requests are in flight (they would hang)."""
        sess = self.need_session()
        with self._cond:
            if self._active:
                raise RpcError(proto.VM_FAILED, "cannot pause: requests are in flight")
        if not sess.sandbox.paused:
            try:
                sess.sandbox.pause()
            except MatchlockError as e:
                raise RpcError(proto.VM_FAILED, str(e)) from None
            # resources.timeout_seconds counts the time the sandbox runs: a pool member's
            # life starts when it is handed out.
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        ctx.result({})

    def _resume(self, ctx: Ctx) -> None:
        """Run the vCPUs again; the guest's wall clock is set and entropy added (agent
        RESUME); resources.timeout_seconds starts again."""
        sess = self.need_session()
        if sess.sandbox.paused:
            try:
                sess.sandbox.resume()
            except AgentGone as e:
                raise RpcError(proto.VM_FAILED, str(sess.sandbox.agent_failure(e))) from None
            except MatchlockError as e:
                raise RpcError(proto.VM_FAILED, str(e)) from None
            self._start_timer(sess.spec.timeout_seconds)
        ctx.result({})

    def _wake(self) -> None:
        """Before a stop: a paused guest must run to answer cancels and flush its disks."""
        sess = self.session
        if sess is not None and not self.closed and sess.sandbox.paused:
            with contextlib.suppress(MatchlockError, AgentGone):
                sess.sandbox.resume()

    def _close(self, ctx: Ctx) -> None:
        timeout = cfg.parse_close_timeout(ctx.params)
        self._stop(timeout, "closed")
        ctx.result({})

    def _expire(self) -> None:
        sess = self.session
        if sess is None or self.closed:
            return
        why = f"timed out after {sess.spec.timeout_seconds:g}s (resources.timeout_seconds)"
        print(f"matchlock rpc: the sandbox {why}", file=sys.stderr, flush=True)
        self._stop(0, why)
        self._closed_why = f"VM {why}"

    def _stop(self, timeout: float, why: str) -> None:
        """Let what runs finish within `timeout`, cancel the rest, stop the sandbox and keep
        it as `stopped` for `matchlock rm`."""
        self._wake()
        if not self._wait_idle(timeout):
            self._cancel_all()
            self._wait_idle(SHUTDOWN_WAIT_S)
        sess = self.session
        if sess is not None and not self.closed:
            from matchlock.state import registry

            sess.stop_entrypoint()
            sess.sandbox.close()
            if sess.sandbox.dir is not None and sess.sandbox.dir.exists():
                registry.mark_stopped(sess.sandbox.dir, why)
        self.closed = True

    def _shutdown(self, reason: str) -> None:
        """End of input (or a signal, or stdout gone): cancel everything, remove the sandbox."""
        if self._active:
            self._wake()
        self._cancel_all()
        self._wait_idle(SHUTDOWN_WAIT_S)
        sess = self.session
        if sess is not None and not self.closed:
            sess.stop_entrypoint()
            sess.sandbox.opts.keep_dir = False
            sess.sandbox.close()
        self.closed = True
        print(f"matchlock rpc: exiting ({reason})", file=sys.stderr, flush=True)

    def _start_reaper(self) -> None:
        """A process that outlives us only to remove what a SIGKILL left (rpc/reaper.py): it
        waits for EOF on a pipe whose only writer is this process."""
        from matchlock.state import registry

        r, w = os.pipe()  # not inherited by any other child (O_CLOEXEC)
        pid = os.getpid()
        try:
            self._reaper = subprocess.Popen(
                [sys.executable, "-m", "matchlock.rpc.reaper", str(pid),
                 str(registry.proc_start_time(pid))],
                stdin=r, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as e:
            os.close(w)
            raise RpcError(proto.VM_FAILED, f"cannot start the sandbox's reaper: {e}") from None
        finally:
            os.close(r)
        self._reaper_fd = w


def _ignore(signo: int, frame: FrameType | None) -> None:
    pass


# Run on the read loop, after the requests in flight (create, close) or refusing them (pause).
_SERIAL = {"create": Server._create, "close": Server._close, "pause": Server._pause,
           "resume": Server._resume}
