"""Interface configuration with the classic SIOCSIF* ioctls.

An ioctl on a datagram socket costs microseconds; running `ip` costs milliseconds per call
(fork + exec) and pyroute2 costs its import. Each function acts on the network namespace of
the *calling thread* (the socket it uses is created there), so call them inside
`SandboxNetns.enter()`.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

# <linux/sockios.h>
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCSIFMTU = 0x8922
SIOCSIFHWADDR = 0x8924
IFF_UP = 0x1
ARPHRD_ETHER = 1
IFNAMSIZ = 16
_IFREQ_SIZE = 40  # struct ifreq on 64-bit Linux: 16-byte name + 24-byte union


def ifname_bytes(name: str) -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw:
        raise ValueError(f"invalid interface name {name!r}")
    return raw


def _ifreq(name: str, payload: bytes) -> bytes:
    head = struct.pack(f"{IFNAMSIZ}s", ifname_bytes(name))
    return head + payload.ljust(_IFREQ_SIZE - IFNAMSIZ, b"\0")


def _sockaddr_in(address: str) -> bytes:
    packed = ipaddress.IPv4Address(address).packed
    return struct.pack("=H2s4s8x", socket.AF_INET, b"\0\0", packed)


def _ioctl(request: int, name: str, payload: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return fcntl.ioctl(s.fileno(), request, _ifreq(name, payload))


def set_up(name: str) -> None:
    flags = struct.unpack_from("=H", _ioctl(SIOCGIFFLAGS, name, b""), IFNAMSIZ)[0]
    _ioctl(SIOCSIFFLAGS, name, struct.pack("=H", flags | IFF_UP))


def set_ipv4(name: str, address: str, prefix: int) -> None:
    """Assign address/prefix; the kernel adds the connected route when the link is up."""
    if not 0 < prefix <= 32:
        raise ValueError(f"invalid prefix length {prefix}")
    netmask = str(ipaddress.IPv4Network(f"0.0.0.0/{prefix}").netmask)
    _ioctl(SIOCSIFADDR, name, _sockaddr_in(address))
    _ioctl(SIOCSIFNETMASK, name, _sockaddr_in(netmask))


def set_mtu(name: str, mtu: int) -> None:
    _ioctl(SIOCSIFMTU, name, struct.pack("=i", mtu))


def set_mac(name: str, mac: str) -> None:
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"invalid MAC address {mac!r}")
    _ioctl(SIOCSIFHWADDR, name, struct.pack("=H6s", ARPHRD_ETHER, raw))
