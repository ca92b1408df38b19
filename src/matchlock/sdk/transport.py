"""JSON-RPC 2.0 over the stdio of a `matchlock rpc` child: ids, pending requests, streamed
notifications routed to the request they belong to, timeouts that cancel."""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import json
import os
import subprocess
import threading
from collections.abc import Callable
from typing import IO, Any

from matchlock.errors import MatchlockError
from matchlock.rpc import datachan
from matchlock.sdk.types import RPCError

Notification = Callable[[str, dict[str, Any]], None]

# The ids of the requests a caller sent, so that a caller that gives up (an asyncio task
# cancelled while its call runs on a worker thread, which inherits this context) can cancel
# them in the sandbox instead of leaving them running.
SENT: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("matchlock_sent",
                                                                        default=None)


class _Pending:
    __slots__ = ("data_end", "data_sink", "done", "error", "on_notification", "result")

    def __init__(self, on_notification: Notification | None,
                 data_sink: Callable[[bytes], None] | None = None) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.on_notification = on_notification
        # Content of this request on the data channel, and its end (datachan.py).
        self.data_sink = data_sink
        self.data_end = threading.Event()


class RPCProcess:
    """One `matchlock rpc` child. Thread-safe: any thread may send requests."""

    def __init__(self, argv: list[str], on_event: Callable[[dict[str, Any]], None] | None = None,
                 data_channel: bool = False) -> None:
        # The data channel: raw file content both ways, beside the JSON lines (datachan.py).
        self._data: tuple[int, int] | None = None  # ours: (read, write)
        theirs: tuple[int, int] | None = None
        if data_channel:
            to_sdk, to_rpc = os.pipe(), os.pipe()
            self._data = (to_sdk[0], to_rpc[1])
            theirs = (to_rpc[0], to_sdk[1])
        # Named in the environment, not on the command line: the child's argv stays the
        # official SDK's (`matchlock rpc`).
        env = None
        if theirs is not None:
            env = {**os.environ, datachan.ENV: f"{theirs[0]},{theirs[1]}"}
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, pass_fds=theirs or (),
                                          env=env)
        except BaseException:
            for fd in self._data or ():
                os.close(fd)
            raise
        finally:
            for fd in theirs or ():
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._data_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._on_event = on_event
        self._reader = threading.Thread(target=self._read_loop, name="matchlock-rpc-reader",
                                        daemon=True)
        self._reader.start()
        if self._data is not None:
            threading.Thread(target=self._read_data, name="matchlock-rpc-data",
                             daemon=True).start()

    @property
    def has_data_channel(self) -> bool:
        return self._data is not None

    def _read_data(self) -> None:
        assert self._data is not None
        fd = self._data[0]
        try:
            while (frame := datachan.read_frame(fd)) is not None:
                req_id, data = frame
                with self._lock:
                    p = self._pending.get(req_id)
                if p is None or p.data_sink is None:
                    continue  # a transfer that was given up: its content is dropped
                if data:
                    p.data_sink(data)
                else:
                    p.data_end.set()
        except (datachan.DataChannelError, OSError):
            pass
        finally:
            os.close(fd)

    def send_data(self, req_id: int, data: bytes) -> None:
        """Content of a transfer on the data channel, in frames (b"": its end)."""
        assert self._data is not None
        view = memoryview(data)
        with self._data_lock:
            try:
                if not view:
                    datachan.write_frame(self._data[1], req_id, b"")
                for off in range(0, len(view), datachan.MAX_FRAME):
                    datachan.write_frame(self._data[1], req_id,
                                         view[off : off + datachan.MAX_FRAME])
            except OSError:
                raise MatchlockError("Matchlock process not running") from None

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def _read_loop(self) -> None:
        out: IO[bytes] | None = self._proc.stdout
        assert out is not None
        for line in out:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict):
                self._dispatch(msg)
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for p in pending:
            p.error = MatchlockError("Matchlock process closed unexpectedly")
            p.done.set()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        msg_id = msg.get("id")
        if msg_id is None:
            method, params = msg.get("method"), msg.get("params")
            if not isinstance(method, str) or not isinstance(params, dict):
                return
            if method == "event":
                if self._on_event is not None:
                    with contextlib.suppress(Exception):
                        self._on_event(params)
                return
            with self._lock:
                target = self._pending.get(params.get("id"))  # type: ignore[arg-type]
            if target is not None and target.on_notification is not None:
                target.on_notification(method, params)
            return
        with self._lock:
            p = self._pending.get(msg_id)
        if p is None:
            return
        err = msg.get("error")
        if err:
            p.error = RPCError(int(err.get("code", 0)), str(err.get("message", "")))
        else:
            p.result = msg.get("result")
        p.done.set()

    def _write(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        with self._write_lock:
            stdin = self._proc.stdin
            if stdin is None or self._proc.poll() is not None:
                raise MatchlockError("Matchlock process not running")
            try:
                stdin.write(data)
                stdin.flush()
            except (BrokenPipeError, ValueError):
                raise MatchlockError("Matchlock process not running") from None

    def begin(self, method: str, params: dict[str, Any] | None = None,
              on_notification: Notification | None = None,
              data_sink: Callable[[bytes], None] | None = None) -> tuple[int, _Pending]:
        req_id = next(self._ids)
        p = _Pending(on_notification, data_sink)
        with self._lock:
            self._pending[req_id] = p
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": req_id}
        if params:
            msg["params"] = params
        sent = SENT.get()
        if sent is not None:
            sent.append(req_id)
        try:
            self._write(msg)
        except BaseException:
            self.forget(req_id)
            raise
        return req_id, p

    def cancel_pending(self, ids: list[int]) -> None:
        """Cancel those of `ids` still waiting for their answer."""
        for req_id in ids:
            with self._lock:
                waiting = req_id in self._pending
            if waiting:
                self.send("cancel", {"id": req_id})

    def finish(self, method: str, req_id: int, p: _Pending, timeout: float | None,
               keep: bool = False) -> Any:
        """The answer to a request (raised if an error). `keep`: stay registered on success
        (the caller still waits for its content on the data channel, then `forget`s it)."""
        ok = False
        try:
            try:
                done = p.done.wait(timeout)
            except KeyboardInterrupt:  # Ctrl-C: the caller gave up; so does the sandbox
                self.send("cancel", {"id": req_id})
                raise
            if not done:
                self.send("cancel", {"id": req_id})
                raise TimeoutError(f"request {method} (id={req_id}) timed out after {timeout}s")
            if p.error is not None:
                raise p.error
            ok = True
            return p.result
        finally:
            if not (ok and keep):
                self.forget(req_id)

    def forget(self, req_id: int) -> None:
        """Stop waiting for a request's answer (it was cancelled; its answer is dropped)."""
        with self._lock:
            self._pending.pop(req_id, None)

    def call(self, method: str, params: dict[str, Any] | None = None,
             on_notification: Notification | None = None, timeout: float | None = None) -> Any:
        req_id, p = self.begin(method, params, on_notification)
        return self.finish(method, req_id, p, timeout)

    def send(self, method: str, params: dict[str, Any]) -> None:
        """A message whose answer nobody waits for (stdin chunks, resize, cancel)."""
        with contextlib.suppress(MatchlockError):
            self._write({"jsonrpc": "2.0", "method": method, "id": next(self._ids),
                         "params": params})

    def set_on_event(self, on_event: Callable[[dict[str, Any]], None] | None) -> None:
        """Who gets `event` notifications from now on (a pool member's new client)."""
        self._on_event = on_event

    def terminate(self) -> None:
        """SIGTERM: the rpc process aborts a boot in progress and removes its sandbox."""
        with contextlib.suppress(OSError):
            self._proc.terminate()

    def shutdown(self, timeout: float) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self._proc.stdin is not None:
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(1)
        if self._data is not None:
            with contextlib.suppress(OSError):
                os.close(self._data[1])
