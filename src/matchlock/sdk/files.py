"""Streamed file transfers of this SDK (`write_file_stream` / `read_file_stream`, extensions
of `matchlock rpc`, docs/rpc.md): the content moves as a sequence of base64 chunks, each its
own JSON line, so no line nears the 10 MiB limit, there is no size limit, and neither side
holds more than a few chunks of a file in memory."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import IO, Any

WRITE_CHUNK = 1 << 20  # raw bytes per write_file_stream.data line (~1.4 MB of JSON)
SMALL_WRITE = 1 << 20  # up to this size write_file sends one reference `write_file` line


def chunks_of(source: bytes | bytearray | memoryview | IO[Any], size: int = WRITE_CHUNK
              ) -> Iterator[bytes]:
    """`source` (bytes, or a binary/text file-like object read to its end) in pieces of at
    most `size` bytes; never an empty piece."""
    if size <= 0:
        raise ValueError("chunk size must be positive")
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source).cast("B")
        for off in range(0, len(view), size):
            yield bytes(view[off : off + size])
        return
    while True:
        piece = source.read(size)
        if piece is None:  # a non-blocking reader with nothing yet: read again
            continue
        if isinstance(piece, str):
            piece = piece.encode()
        if not piece:
            return
        yield bytes(piece)


def data_params(req_id: int, chunk: bytes) -> dict[str, Any]:
    return {"id": req_id, "data": base64.b64encode(chunk).decode("ascii")}


def decode_data(params: dict[str, Any]) -> bytes:
    """A `read_file_stream.data` chunk (the server's base64: strict)."""
    return base64.b64decode(str(params.get("data", "")), validate=True)
