"""The destination a DNAT-ed connection was originally sent to."""

from __future__ import annotations

import socket
import struct

# From <linux/netfilter_ipv4.h>; not exported by the socket module.
SO_ORIGINAL_DST = 80
_SOCKADDR_IN_LEN = 16


def parse_sockaddr_in(raw: bytes) -> tuple[str, int]:
    """(address, port) from a struct sockaddr_in as the kernel returns it."""
    if len(raw) < 8:
        raise ValueError(f"sockaddr_in too short ({len(raw)} bytes)")
    family = struct.unpack_from("=H", raw, 0)[0]  # host byte order, like the kernel's
    if family != socket.AF_INET:
        raise ValueError(f"not an AF_INET address (family {family})")
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The pre-NAT (address, port) of an accepted IPv4 TCP connection.

    Raises OSError (ENOENT) when the connection was not NAT-ed by conntrack.
    """
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_LEN)
    return parse_sockaddr_in(raw)
