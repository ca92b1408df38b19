"""The guest's NIC on the host side: a TAP device inside the sandbox's namespace.

The device exists only while its fd is open (it is not made persistent), so it disappears
with the VMM and with us. The fd is handed to QEMU as `-netdev tap,fd=N`. QEMU does not take a
`vnet_hdr=` option together with `fd=`: it asks the fd (TUNGETIFF) whether IFF_VNET_HDR is set
and, if so, uses virtio-net headers, which lets the guest hand checksum and segmentation
offload to the host instead of computing them under TCG. So we set it.
"""

from __future__ import annotations

import fcntl
import os
import struct

from matchlock.net.link import IFNAMSIZ, ifname_bytes
from matchlock.net.netns import SandboxNetns

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000


def open_tap(name: str, *, vnet_hdr: bool = True) -> int:
    """Create TAP `name` in the calling thread's namespace; returns its O_CLOEXEC fd."""
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
    ifr = struct.pack(f"{IFNAMSIZ}sH22x", ifname_bytes(name), flags)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, ifr)
    except BaseException:
        os.close(fd)
        raise
    return fd


def tap_flags(fd: int) -> int:
    """The IFF_* flags of a TAP fd, as QEMU probes them."""
    out = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    return int(struct.unpack_from("=H", out, IFNAMSIZ)[0])


def create_tap(ns: SandboxNetns, name: str = "tap0", *, vnet_hdr: bool = True) -> int:
    """A TAP device inside `ns` (the TUN driver uses the creating thread's namespace)."""
    with ns.enter():
        return open_tap(name, vnet_hdr=vnet_hdr)
