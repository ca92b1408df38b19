"""One request in flight (`Ctx`: answered once, cancellable), and the stdin queue of an
exec_pipe/exec_tty (`StdinFeed`), the content queue of a write_file_stream (`FileFeed`)."""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from matchlock.guest.client import AgentGone, Exec
from matchlock.rpc import protocol as proto

STDIN_QUEUE_LIMIT = 16 << 20  # queued stdin per exec before the read loop waits
FILE_QUEUE_LIMIT = 8 << 20  # queued content per write_file_stream before the read loop waits


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


class _Feed:
    """Chunks queued by the read loop, in order (past `limit` queued bytes the loop waits),
    taken by another thread; ending the feed drops what is queued and wakes both sides."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._items: deque[bytes | None] = deque()
        self._pending = 0
        self._cond = threading.Condition()
        self._ended = False

    def put(self, data: bytes | None) -> None:
        """A chunk, or None for the end of the content."""
        with self._cond:
            while self._pending > self._limit and not self._ended:
                self._cond.wait(0.5)
            if self._ended:
                return
            self._items.append(data)
            self._pending += len(data or b"")
            self._cond.notify_all()

    def end(self) -> None:
        with self._cond:
            self._end_locked()

    def _end_locked(self) -> None:
        self._ended = True
        self._items.clear()
        self._pending = 0
        self._cond.notify_all()

    def _take(self, wait: float | None,
              stop: threading.Event | None = None) -> tuple[bool, bytes | None]:
        """(True, the next item), or (False, None) once the feed ended or `stop` is set."""
        with self._cond:
            while not self._items and not self._ended:
                self._cond.wait(wait)
            if self._ended or (stop is not None and stop.is_set()):
                return False, None
            item = self._items.popleft()
            self._pending -= len(item or b"")
            self._cond.notify_all()
            return True, item


class StdinFeed(_Feed):
    """Stdin for one exec_pipe/exec_tty: queued by the read loop, written by a thread (the
    guest acknowledges stdin in a window; waiting for it must not stop the read loop)."""

    def __init__(self, ex: Exec, tty: bool) -> None:
        super().__init__(STDIN_QUEUE_LIMIT)
        self.ex = ex
        self.tty = tty

    def run(self) -> None:
        try:
            while True:
                more, item = self._take(None)
                if not more:
                    return
                if item is None:
                    # For a PTY the reference only stops forwarding: the terminal stays open.
                    if not self.tty:
                        self.ex.close_stdin()
                    return
                self.ex.write_stdin(item)
        except (AgentGone, OSError):
            pass


class FileFeed(_Feed):
    """The content of one write_file_stream: chunks queued by the read loop (in order, at most
    FILE_QUEUE_LIMIT bytes before the loop waits), taken by the request's thread, which sends
    them to the guest. `end()` (cancel, failure) drops what is queued and makes the taker
    raise, so the guest discards the partial file."""

    def __init__(self) -> None:
        super().__init__(FILE_QUEUE_LIMIT)
        self.failure = ""  # why the content was refused (bad base64, a broken data channel)
        self.via_fd = False  # the content comes over the data channel, not JSON lines

    def end(self, failure: str = "") -> None:
        with self._cond:
            if not self._ended and failure:
                self.failure = failure
            self._end_locked()

    def chunks(self, cancelled: threading.Event) -> Iterator[bytes]:
        while True:
            more, item = self._take(0.5, cancelled)
            if not more:
                raise FeedEnded
            if item is None:
                return
            yield item


class FeedEnded(Exception):
    """A write_file_stream ended before its content did (cancelled, or the session ends)."""
