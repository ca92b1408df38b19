"""The real TAP path without a VM: raw Ethernet frames written to and read from the TAP fd,
as QEMU's virtio-net would (each frame behind a 10-byte virtio_net_hdr, IFF_VNET_HDR)."""

from __future__ import annotations

import os
import select
import socket
import struct
from collections.abc import Iterator

import dns.message
import dns.rdatatype
import pytest

from matchlock.net import firewall
from matchlock.net.stack import SandboxNetwork
from tests.net.netenv import AllowList, needs_root

pytestmark = [needs_root, pytest.mark.timeout(30)]

VNET_HDR = bytes(10)  # no offloads requested
GUEST_MAC = bytes.fromhex("026d6c000002")
GW_MAC = bytes.fromhex("026d6c000001")
GUEST_IP = socket.inet_aton("10.213.0.2")
GW_IP = socket.inet_aton("10.213.0.1")


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def ipv4(proto: int, dst: bytes, payload: bytes) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0,
                       GUEST_IP, dst)
    return head[:10] + struct.pack("!H", checksum(head)) + head[12:] + payload


def udp(dst: bytes, dport: int, data: bytes) -> bytes:
    seg = struct.pack("!HHHH", 40000, dport, 8 + len(data), 0) + data
    pseudo = GUEST_IP + dst + struct.pack("!BBH", 0, 17, len(seg))
    seg = seg[:6] + struct.pack("!H", checksum(pseudo + seg) or 0xFFFF) + seg[8:]
    return ipv4(17, dst, seg)


def ether(payload: bytes, ethertype: int = 0x0800, dst: bytes = GW_MAC) -> bytes:
    return VNET_HDR + dst + GUEST_MAC + struct.pack("!H", ethertype) + payload


def arp_request() -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, GUEST_MAC, GUEST_IP, bytes(6), GW_IP)
    return ether(body, 0x0806, dst=b"\xff" * 6)


def read_frames(fd: int, timeout: float) -> Iterator[bytes]:
    while select.select([fd], [], [], timeout)[0]:
        yield os.read(fd, 65536)[len(VNET_HDR):]


def first(fd: int, ethertype: bytes, ip_proto: int | None = None) -> bytes | None:
    for f in read_frames(fd, 1.0):
        if f[12:14] == ethertype and (ip_proto is None or f[23] == ip_proto):
            return f
    return None


@pytest.fixture
def net() -> Iterator[SandboxNetwork]:
    n = SandboxNetwork()
    n.start(AllowList("allowed.test"), _unused)
    os.set_blocking(n.tap_fd, False)
    try:
        yield n
    finally:
        n.close()


async def _unused(*args: object) -> None:
    pass


def test_arp_and_dns_over_the_tap(net: SandboxNetwork) -> None:
    fd = net.tap_fd
    os.write(fd, arp_request())
    arp = first(fd, b"\x08\x06")
    assert arp is not None and arp[6:12] == GW_MAC  # the gateway answers with its fixed MAC

    query = dns.message.make_query("allowed.test", "A")
    os.write(fd, ether(udp(GW_IP, 53, query.to_wire())))
    frame = first(fd, b"\x08\x00", 17)
    assert frame is not None, "no DNS reply on the TAP"
    reply = dns.message.from_wire(frame[14 + 20 + 8:])
    assert reply.id == query.id
    (rrset,) = reply.answer
    assert rrset.rdtype == dns.rdatatype.A and str(next(iter(rrset))) == "198.18.0.1"


def test_other_udp_on_the_tap_is_dropped(net: SandboxNetwork) -> None:
    fd = net.tap_fd
    os.write(fd, ether(udp(GW_IP, 9999, b"hello")))
    os.write(fd, ether(udp(socket.inet_aton("198.18.0.53"), 53, b"x" * 20)))
    assert not [f for f in read_frames(fd, 0.5) if f[12:14] == b"\x08\x00"]
    counts = firewall.counters(net.netns)
    assert counts["udp_drop"] == 2 and counts["dns"] == 0
