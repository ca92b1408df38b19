"""One request in flight (`Ctx`: answered once, cancellable), and the stdin queue of an
exec_pipe/exec_tty (`StdinFeed`)."""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from matchlock.guest.client import AgentGone, Exec
from matchlock.rpc import protocol as proto

STDIN_QUEUE_LIMIT = 16 << 20  # queued stdin per exec before the read loop waits


class Ctx:
    """One request in flight: its id, whether it was cancelled, what cancelling does."""

    def __init__(self, write: Callable[[bytes], None], req: proto.Request) -> None:
        self._write = write
        self.id = req.id
        self.method = req.method
        self.params = req.params
        self.cancelled = threading.Event()
        self._on_cancel: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._answered = False

    def on_cancel(self, cb: Callable[[], None]) -> None:
        with self._lock:
            if not self.cancelled.is_set():
                self._on_cancel.append(cb)
                return
        cb()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled.set()
            cbs, self._on_cancel = self._on_cancel, []
        for cb in cbs:
            with contextlib.suppress(Exception):
                cb()

    def answer(self, data: bytes) -> None:
        with self._lock:
            if self._answered:
                return
            self._answered = True
        self._write(data)

    def result(self, result: Any) -> None:
        self.answer(proto.encode_result(self.id, result))

    def error(self, code: int, message: str) -> None:
        self.answer(proto.encode_error(self.id, code, message))


class StdinFeed:
    """Stdin for one exec_pipe/exec_tty: queued by the read loop, written by a thread (the
    guest acknowledges stdin in a window; waiting for it must not stop the read loop)."""

    def __init__(self, ex: Exec, tty: bool) -> None:
        self.ex = ex
        self.tty = tty
        self._items: deque[bytes | None] = deque()
        self._pending = 0
        self._cond = threading.Condition()
        self._ended = False

    def put(self, data: bytes | None) -> None:
        with self._cond:
            while self._pending > STDIN_QUEUE_LIMIT and not self._ended:
                self._cond.wait(0.5)
            if self._ended:
                return
            self._items.append(data)
            self._pending += len(data or b"")
            self._cond.notify_all()

    def end(self) -> None:
        with self._cond:
            self._ended = True
            self._items.clear()
            self._cond.notify_all()

    def run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._items and not self._ended:
                        self._cond.wait()
                    if self._ended:
                        return
                    item = self._items.popleft()
                    self._pending -= len(item or b"")
                    self._cond.notify_all()
                if item is None:
                    # For a PTY the reference only stops forwarding: the terminal stays open.
                    if not self.tty:
                        self.ex.close_stdin()
                    return
                self.ex.write_stdin(item)
        except (AgentGone, OSError):
            pass
