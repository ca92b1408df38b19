"""Audit events: one per request or block, written as JSON lines.

Events carry the path without its query string (queries hold tokens and, after substitution,
could hold secret values), and never headers or bodies.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import IO, Literal

Action = Literal["allow", "block"]
AuditSink = Callable[["AuditEvent"], None]


@dataclass(slots=True)
class AuditEvent:
    host: str
    port: int
    action: Action
    reason: str
    method: str = ""
    path: str = ""
    status: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    duration_ms: float = 0.0
    protocol: str = ""  # http, https, h2, websocket, tcp, tls
    sandbox: str = ""
    time: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, object]:
        """The event's fields, text fields cut to their limits (they come from the guest)."""
        # Not dataclasses.asdict: it deep-copies, and this runs once per proxied request.
        data: dict[str, object] = {name: getattr(self, name) for name in _FIELDS}
        for name, limit in _LIMITS.items():
            data[name] = _cut(getattr(self, name), limit)
        data["duration_ms"] = round(self.duration_ms, 3)
        return data

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), separators=(",", ":"))

    def summary(self) -> str:
        """One human line for `--log-network`."""
        d = self.as_dict()
        what = f"{d['method']} {d['path']}" if self.method else d["protocol"] or "tcp"
        status = f" {self.status}" if self.status else ""
        tail = f" ({d['reason']})" if self.action == "block" else ""
        return (
            f"{self.action:5} {d['host']}:{self.port} {what}{status} "
            f"up={self.bytes_up} down={self.bytes_down} {self.duration_ms:.1f}ms{tail}"
        )


_FIELDS = tuple(f.name for f in fields(AuditEvent))
# A blocked 8 KiB request line must not make an 8 KiB audit line.
_LIMITS = {"host": 256, "method": 32, "path": 512, "reason": 512, "protocol": 16, "sandbox": 64}


# Control characters (guest-chosen paths printed by --log-network) could drive the terminal.
_CONTROL = {c: "?" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}


def _cut(text: str, limit: int) -> str:
    text = text.translate(_CONTROL)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…(+{len(text) - limit} chars)"


def strip_query(target: str) -> str:
    return target.split("?", 1)[0].split("#", 1)[0]


class JsonLinesSink:
    """Appends events to a text stream, one JSON object per line, flushed per event."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, event: AuditEvent) -> None:
        line = event.to_json() + "\n"
        with self._lock:
            self._stream.write(line)
            self._stream.flush()


class MemorySink:
    """Keeps events in a list (tests, RPC event pumps)."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def __call__(self, event: AuditEvent) -> None:
        self.events.append(event)


def fan_out(*sinks: AuditSink) -> AuditSink:
    def emit(event: AuditEvent) -> None:
        for sink in sinks:
            sink(event)

    return emit
