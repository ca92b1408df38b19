"""Keeping secret values from coming back to the guest, and placeholders from leaving raw.

Pure (no I/O). An origin that echoes a request (many debugging endpoints do) would hand the
guest the value the proxy injected, so everything headed to the guest passes a mask that
overwrites each value with `*` of the same length. Equal length keeps every framing that
counts bytes true (Content-Length, chunk sizes, WebSocket frame lengths, TLS records are
ours), so masking never needs to buffer a whole body: only a tail that could still begin a
value is held back until the next bytes decide it.

Masks see decoded payloads. A value split across two HTTP/1 chunks or two WebSocket frames
is still one value to the client that reassembles them, so the framing bytes between payload
pieces are kept aside (`MaskedSequence`) while the payloads are matched as one stream.
Transformations (compression, base64, reversal) cannot be recognised; docs/network.md says so.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class ValueMask:
    """Redacts values from a byte stream fed in pieces (see the module doc)."""

    __slots__ = ("_held", "_values")

    def __init__(self, values: Iterable[bytes]) -> None:
        self._values = sorted({v for v in values if v}, key=len, reverse=True)
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        buf = self._held + data if self._held else data
        for v in self._values:
            if v in buf:
                buf = buf.replace(v, b"*" * len(v))
        hold = 0
        for v in self._values:
            # The longest tail of buf that begins v: the earliest start that matches.
            i = buf.find(v[:1], max(0, len(buf) - len(v) + 1))
            while i != -1 and len(buf) - i > hold:
                if v.startswith(buf[i:]):
                    hold = len(buf) - i
                    break
                i = buf.find(v[:1], i + 1)
        self._held = buf[len(buf) - hold :] if hold else b""
        return buf[: len(buf) - hold] if hold else buf

    def fresh(self) -> ValueMask:
        """Another mask for the same values, with nothing held (a second stream)."""
        other = ValueMask(())
        other._values = self._values
        return other

    @property
    def holding(self) -> int:
        return len(self._held)

    def flush(self) -> bytes:
        out, self._held = self._held, b""
        return out

    def all(self, data: bytes) -> bytes:
        """A complete piece (a head, a control frame): mask it and release any hold at once."""
        return self.feed(data) + self.flush()


class MaskedSequence:
    """Payload pieces masked as one stream, with framing bytes kept in their places.

    `payload()` adds bytes that the receiver will join into one stream (chunk data, the
    data frames of WebSocket messages); `framing()` adds bytes that sit between them on the
    wire (chunk-size lines, frame headers, control frames already masked whole). `take()`
    returns what may be sent now: everything up to the first payload byte still held by the
    mask. The output has exactly the input's length and layout.
    """

    __slots__ = ("_mask", "_order", "_out", "_released")

    def __init__(self, mask: ValueMask) -> None:
        self._mask = mask
        self._order: deque[int | bytes] = deque()  # payload byte counts and framing pieces
        self._released = bytearray()  # masked payload bytes not yet placed
        self._out = bytearray()

    def payload(self, data: bytes) -> None:
        if data:
            self._order.append(len(data))
            self._released += self._mask.feed(data)
            self._place()

    def framing(self, data: bytes) -> None:
        if data:
            self._order.append(data)
            self._place()

    def finish(self) -> None:
        """The stream ended: release what the mask held."""
        self._released += self._mask.flush()
        self._place()

    def take(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def _place(self) -> None:
        order, released, out = self._order, self._released, self._out
        while order:
            head = order[0]
            if isinstance(head, bytes):
                out += head
                order.popleft()
                continue
            if not released:
                return
            n = min(head, len(released))
            out += released[:n]
            del released[:n]
            if n == head:
                order.popleft()
            else:
                order[0] = head - n


class PlaceholderScanner:
    """Finds placeholders in a byte stream fed in pieces (raw TCP, where nothing is replaced:
    a placeholder there is a secret headed somewhere it cannot be checked)."""

    __slots__ = ("_keep", "_names", "_tail")

    def __init__(self, placeholders: dict[bytes, str]) -> None:
        self._names = placeholders
        self._keep = max((len(p) for p in placeholders), default=1) - 1
        self._tail = b""

    def feed(self, data: bytes) -> str | None:
        """The name of the secret whose placeholder appears, or None."""
        buf = self._tail + data
        for placeholder, name in self._names.items():
            if placeholder in buf:
                return name
        self._tail = buf[-self._keep :] if self._keep else b""
        return None
