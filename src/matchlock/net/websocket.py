"""WebSocket frames from the origin to the guest, masked for secret values (pure, no I/O).

After a WebSocket upgrade the proxy relays frames, and an origin that echoes messages could
send a value the proxy injected into the upgrade request straight back. The guest's client
joins the payloads of a message's frames, so values are matched across fragments: data-frame
payloads go through one mask as one stream, while frame headers stay where they are and keep
their lengths (masking is length-preserving). Control frames (ping, pong, close; at most 125
bytes, never fragmented, allowed between fragments) are masked whole on their own, since the
client does not join them to the message.

Compression (permessage-deflate) is not offered when a value went into the upgrade request
(`SecretSet.inject` drops `Sec-WebSocket-Extensions`), so payloads are plain bytes. Frames
from a server must not be masked (RFC 6455 §5.1); one that is ends the connection.
"""

from __future__ import annotations

from matchlock.net.masking import MaskedSequence, ValueMask

MAX_CONTROL = 125


class WebSocketError(Exception):
    """The origin broke the framing; the relay closes both sides."""


class ServerFrameMask:
    """Feed server→client bytes, get them back with secret values masked (same length)."""

    __slots__ = ("_control", "_ctl_head", "_ctl_payload", "_head", "_left", "_out")

    def __init__(self, data_mask: ValueMask, control_mask: ValueMask) -> None:
        self._out = MaskedSequence(data_mask)
        self._control = control_mask
        self._head = bytearray()  # a frame header still incomplete
        self._left = 0  # payload bytes of the current frame still to come
        self._ctl_head: bytes | None = None  # set while inside a control frame
        self._ctl_payload = bytearray()

    def feed(self, data: bytes) -> bytes:
        pos, n = 0, len(data)
        while pos < n:
            if self._left:
                take = min(self._left, n - pos)
                piece = data[pos : pos + take]
                pos += take
                self._left -= take
                if self._ctl_head is None:
                    self._out.payload(piece)
                else:
                    self._ctl_payload += piece
                    if not self._left:
                        self._end_control()
                continue
            if len(self._head) < 2:
                take = min(2 - len(self._head), n - pos)
                self._head += data[pos : pos + take]
                pos += take
                if len(self._head) < 2:
                    continue
            need = self._header_length()
            take = min(need - len(self._head), n - pos)
            self._head += data[pos : pos + take]
            pos += take
            if len(self._head) == need:
                self._start_frame()
        return self._out.take()

    def finish(self) -> bytes:
        """The origin closed: release what the data mask held (a truncated frame is the
        origin's problem; the bytes already sent stay consistent with their headers)."""
        self._out.finish()
        return self._out.take()

    def _header_length(self) -> int:
        """The full header length, from its first two bytes."""
        if self._head[1] & 0x80:
            raise WebSocketError("the origin sent a masked frame (servers must not mask)")
        short = self._head[1] & 0x7F
        return 2 + (2 if short == 126 else 8 if short == 127 else 0)

    def _start_frame(self) -> None:
        head = bytes(self._head)
        self._head.clear()
        short = head[1] & 0x7F
        if short == 126:
            length = int.from_bytes(head[2:4], "big")
        elif short == 127:
            length = int.from_bytes(head[2:10], "big")
            if length >> 63:
                raise WebSocketError("frame length with the high bit set")
        else:
            length = short
        opcode = head[0] & 0x0F
        if opcode >= 8:
            if length > MAX_CONTROL or not head[0] & 0x80:
                raise WebSocketError("control frame longer than 125 bytes or fragmented")
            self._ctl_head = head
            self._left = length
            if not length:
                self._end_control()
            return
        self._out.framing(head)
        self._left = length

    def _end_control(self) -> None:
        assert self._ctl_head is not None
        self._out.framing(self._ctl_head + self._control.all(bytes(self._ctl_payload)))
        self._ctl_head = None
        self._ctl_payload.clear()
