"""HTTP/2 buffering per guest connection stays bounded when the origin or the guest is slow.

The bound is documented in matchlock.net.h2relay. Per stream the proxy holds at most the
stream's flow-control window (64 KiB, what the guest may send unacknowledged) plus
STREAM_BUFFER queued towards the origin, or, downloading, STREAM_BUFFER plus one transport
read from the origin and the guest's window in flight. Here a guest pushes and pulls hard
against an origin that never reads and a guest that never reads, and the proxy's holdings are
sampled while it does.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import time

import h2.config
import h2.connection
import pytest
from proxy_testutil import Rig

from matchlock.net import h2relay
from matchlock.net.streams import READ_SIZE

pytestmark = pytest.mark.timeout(60)

STREAMS = 4
WINDOW = 65535  # h2's default initial stream window, which the proxy advertises
FRAME = 16384


def held(rig: Rig) -> int:
    async def measure() -> int:
        sessions = [o for o in gc.get_objects() if isinstance(o, h2relay.H2Session)]
        return sum(s.buffered() for s in sessions)

    return int(rig.call(measure()))


def h2_client(rig: Rig) -> tuple[socket.socket, h2.connection.H2Connection]:
    s = socket.create_connection(("127.0.0.1", rig.proxy_port), timeout=10)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    s.sendall(c.data_to_send())
    s.settimeout(0.05)
    return s, c


def read_frames(s: socket.socket, c: h2.connection.H2Connection) -> None:
    """Take in window updates (never acknowledging response data)."""
    try:
        data = s.recv(65536)
    except TimeoutError:
        return
    if data:
        c.receive_data(data)
        out = c.data_to_send()
        if out:
            s.sendall(out)


def test_slow_origin_does_not_let_uploads_pile_up(rig: Rig) -> None:
    async def start_sink() -> tuple[asyncio.Server, int]:
        async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(30)

        server = await asyncio.start_server(never_read, "127.0.0.1", 0)
        return server, server.sockets[0].getsockname()[1]

    sink, port = rig.call(start_sink())
    try:
        rig.configure([f"sink.test:{port}"], pins=["sink.test:127.0.0.1"])
        rig.aim("sink.test", port)
        s, c = h2_client(rig)
        # One stream: the kernel's socket buffers (~4 MiB on loopback) fill within seconds,
        # and from then on only the proxy could hold more.
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, [(":method", "POST"), (":path", "/up"), (":scheme", "http"),
                             (":authority", f"sink.test:{port}"),
                             ("content-length", str(1 << 30))])
        s.sendall(c.data_to_send())
        sent, peak, stalled_since = 0, 0, time.monotonic()
        block = b"x" * FRAME
        end = time.monotonic() + 30
        while time.monotonic() < end and time.monotonic() - stalled_since < 2:
            window = min(c.local_flow_control_window(sid), FRAME)
            if window > 0:
                c.send_data(sid, block[:window])
                sent += window
                stalled_since = time.monotonic()
                s.sendall(c.data_to_send())
            read_frames(s, c)
        for _ in range(10):  # stalled: the origin takes nothing more; what does the proxy hold?
            peak = max(peak, held(rig))
            time.sleep(0.05)
        # What the guest may send unacknowledged, plus what waits for the origin.
        bound = WINDOW + h2relay.STREAM_BUFFER + FRAME
        assert time.monotonic() - stalled_since >= 2, "the upload never stalled"
        assert sent > 2 << 20  # far more than the bound went in before it stalled
        assert 0 < peak <= bound, (peak, bound, sent)
        s.close()
    finally:
        rig.call(_close(sink))


def test_guest_that_stops_reading_does_not_make_the_proxy_buffer_downloads(rig: Rig) -> None:
    rig.configure([f"origin.test:{rig.http.port}"], pins=["origin.test:127.0.0.1"])
    rig.aim("origin.test", rig.http.port)
    s, c = h2_client(rig)
    for _ in range(STREAMS):
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, [(":method", "GET"), (":path", f"/big/{50 << 20}"),
                             (":scheme", "http"), (":authority", f"origin.test:{rig.http.port}")],
                       end_stream=True)
    s.sendall(c.data_to_send())
    peak = 0
    for _ in range(30):  # never read: the guest's windows stay shut after the first 64 KiB
        time.sleep(0.1)
        peak = max(peak, held(rig))
    bound = STREAMS * (h2relay.STREAM_BUFFER + READ_SIZE + WINDOW) + 2 * FRAME
    assert 0 < peak <= bound, (peak, bound)
    s.close()


async def _close(server: asyncio.Server) -> None:
    server.close()
