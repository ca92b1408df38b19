"""Download progress for pulls: per layer and in total, bytes and rate.

A terminal gets live bars (rich); anything else (CI logs, pipes) gets a few plain lines: one
per finished layer, one every few seconds while bytes flow, and a summary. Methods are called
from the download threads, so state changes happen under a lock.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Any

MB = 1_000_000
_PLAIN_INTERVAL_S = 5.0


def short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


def human_bytes(n: float) -> str:
    return f"{n / MB:.1f} MB"


def human_rate(n: float, seconds: float) -> str:
    return f"{n / MB / max(seconds, 1e-6):.1f} MB/s"


@dataclass
class _Layer:
    index: int
    size: int
    done: int = 0
    finished: bool = False


class PullProgress:
    """Counts bytes; subclasses render. This base class renders nothing (quiet mode).

    `title` (e.g. "pulling NAME") heads the output; it is shown only once a download starts,
    so a pull that fails early prints nothing but its error.
    """

    def __init__(self, title: str = "") -> None:
        self.title = title
        self._lock = threading.Lock()
        self._layers: dict[str, _Layer] = {}
        self._started = time.monotonic()
        self.downloaded = 0  # bytes received in this process (not counting resumed parts)

    def begin(self, layers: list[tuple[str, int]], present: set[str]) -> None:
        with self._lock:
            for i, (digest, size) in enumerate(layers, 1):
                layer = _Layer(i, size)
                if digest in present:
                    layer.done, layer.finished = size, True
                self._layers[digest] = layer
            self._started = time.monotonic()
        self._render_begin(len(layers), len(present))

    def resumed(self, digest: str, offset: int) -> None:
        with self._lock:
            self._layers[digest].done = offset
        self._render_update(digest)

    def advance(self, digest: str, n: int) -> None:
        with self._lock:
            self._layers[digest].done += n
            self.downloaded += n
        self._render_update(digest)

    def restarted(self, digest: str) -> None:
        with self._lock:
            self._layers[digest].done = 0
        self._render_update(digest)

    def finished(self, digest: str) -> None:
        with self._lock:
            layer = self._layers[digest]
            layer.done, layer.finished = layer.size, True
        self._render_finished(digest)

    def close(self) -> None:
        self._render_close()

    # -- totals for renderers -------------------------------------------------------------

    def totals(self) -> tuple[int, int]:
        with self._lock:
            return (sum(x.done for x in self._layers.values()),
                    sum(x.size for x in self._layers.values()))

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    # -- rendering hooks -------------------------------------------------------------------

    def _render_begin(self, count: int, present: int) -> None:
        pass

    def _render_update(self, digest: str) -> None:
        pass

    def _render_finished(self, digest: str) -> None:
        pass

    def _render_close(self) -> None:
        pass


class PlainProgress(PullProgress):
    """Plain lines for logs: no cursor movement, no redraws."""

    def __init__(self, out: IO[str], title: str = "", prefix: str = "matchlock: ") -> None:
        super().__init__(title)
        self._out = out
        self._prefix = prefix
        self._last_line = time.monotonic()

    def _say(self, text: str) -> None:
        self._out.write(f"{self._prefix}{text}\n")
        self._out.flush()

    def _render_begin(self, count: int, present: int) -> None:
        done, total = self.totals()
        cached = f", {present} already present" if present else ""
        head = f"{self.title}: " if self.title else ""
        self._say(f"{head}{count} layers, {human_bytes(total)}{cached}; "
                  f"{human_bytes(total - done)} to download")

    def _render_update(self, digest: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last_line < _PLAIN_INTERVAL_S:
                return
            self._last_line = now
        done, total = self.totals()
        percent = 100 * done / total if total else 100
        self._say(f"{human_bytes(done)} of {human_bytes(total)} ({percent:.0f}%), "
                  f"{human_rate(self.downloaded, self.elapsed())}")

    def _render_finished(self, digest: str) -> None:
        with self._lock:
            layer = self._layers[digest]
            count = len(self._layers)
        self._say(f"layer {layer.index}/{count} {short(digest)} {human_bytes(layer.size)} done")

    def _render_close(self) -> None:
        if self.downloaded:
            elapsed = self.elapsed()
            self._say(f"downloaded {human_bytes(self.downloaded)} in {elapsed:.1f}s "
                      f"({human_rate(self.downloaded, elapsed)})")


class RichProgress(PullProgress):
    """Live bars on a terminal: one per layer and a total."""

    def __init__(self, title: str = "") -> None:
        super().__init__(title)
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._console = self._bars.console
        self._tasks: dict[str, Any] = {}
        self._total: Any = None

    def _render_begin(self, count: int, present: int) -> None:
        if self.title:
            self._console.print(f"matchlock: {self.title}", highlight=False)
        with self._lock:
            layers = sorted(self._layers.items(), key=lambda item: item[1].index)
        for digest, layer in layers:
            self._tasks[digest] = self._bars.add_task(
                f"{layer.index}/{count} {short(digest)}", total=layer.size, completed=layer.done
            )
        done, total = self.totals()
        self._total = self._bars.add_task("total", total=total, completed=done)
        self._bars.start()

    def _render_update(self, digest: str) -> None:
        with self._lock:
            done = self._layers[digest].done
        self._bars.update(self._tasks[digest], completed=done)
        self._bars.update(self._total, completed=self.totals()[0])

    def _render_finished(self, digest: str) -> None:
        self._render_update(digest)

    def _render_close(self) -> None:
        self._bars.stop()


def make_progress(quiet: bool = False, title: str = "") -> PullProgress:
    if quiet:
        return PullProgress(title)
    if sys.stderr.isatty():
        return RichProgress(title)
    return PlainProgress(sys.stderr, title)
