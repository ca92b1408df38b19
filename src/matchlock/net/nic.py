"""The guest's link into its sandbox namespace: the part the VMM needs before it starts.

Kept apart from `stack` (and free of asyncio, DNS and TLS imports) so that the owner can open
the namespace and TAP in a couple of milliseconds, start the VMM, and bring up the firewall,
resolver and proxy in the background while the guest boots or is restored. The guest cannot
send a packet before its SETUP configures eth0, and SETUP waits for those services.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from matchlock.net import link
from matchlock.net.addressing import Addressing
from matchlock.net.netns import SandboxNetns
from matchlock.net.tap import open_tap

# Creates the guest's link inside the namespace (the calling thread is already in it) and
# returns an fd for the VMM, or None. Tests replace the TAP with a veth pair.
LinkFactory = Callable[[SandboxNetns, str], "int | None"]


def tap_link(ns: SandboxNetns, iface: str) -> int:
    return open_tap(iface, vnet_hdr=True)


@dataclass
class Nic:
    netns: SandboxNetns
    tap_fd: int | None
    iface: str
    addressing: Addressing

    def qemu_args(self, netdev_id: str = "n0") -> list[str]:
        """QEMU arguments for the NIC; pass `tap_fd` in the VMM's pass_fds."""
        return [
            "-netdev", f"tap,id={netdev_id},fd={self.tap_fd}",
            "-device", f"virtio-net-device,netdev={netdev_id},mac={self.addressing.guest_mac}",
        ]

    def close(self) -> None:
        """Release a NIC that never got to a SandboxNetwork (which otherwise owns it)."""
        if self.tap_fd is not None:
            os.close(self.tap_fd)
            self.tap_fd = None
        self.netns.close()


def open_nic(addressing: Addressing | None = None, iface: str = "tap0",
             link_factory: LinkFactory = tap_link) -> Nic:
    a = addressing or Addressing()
    ns = SandboxNetns()
    fd: int | None = None
    try:
        with ns.enter():
            fd = link_factory(ns, iface)
            link.set_mac(iface, a.gateway_mac)
            link.set_mtu(iface, a.mtu)
            link.set_ipv4(iface, a.gateway, a.prefix)
            link.set_up(iface)
    except BaseException:
        if fd is not None:
            os.close(fd)
        ns.close()
        raise
    return Nic(ns, fd, iface, a)
