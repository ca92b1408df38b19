"""The fixed addressing of every sandbox's private link (docs/network.md, Topology).

Every sandbox uses the same addresses: its namespace is private, and identical guest network
state is what a future snapshot/restore start path needs. The MACs are fixed for the same
reason (a restored guest's neighbour cache must stay valid).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from matchlock.guest.protocol import NetConfig

SYNTHETIC_NET = ipaddress.IPv4Network("198.18.0.0/15")


@dataclass(frozen=True)
class Addressing:
    gateway: str = "10.213.0.1"
    guest: str = "10.213.0.2"
    prefix: int = 24
    mtu: int = 1500
    proxy_port: int = 15001
    dns_port: int = 53
    # Locally administered unicast addresses (bit 1 of the first octet set).
    guest_mac: str = "02:6d:6c:00:00:02"
    gateway_mac: str = "02:6d:6c:00:00:01"

    def __post_init__(self) -> None:
        net = ipaddress.IPv4Network(f"{self.gateway}/{self.prefix}", strict=False)
        if ipaddress.IPv4Address(self.guest) not in net or self.guest == self.gateway:
            raise ValueError("the guest and the gateway must share one subnet")
        if net.overlaps(SYNTHETIC_NET):
            raise ValueError("the link subnet must not overlap the synthetic range")


@dataclass(frozen=True)
class GuestConfig:
    """What the agent's SETUP must configure on the guest's eth0."""

    address: str
    prefix: int
    gateway: str
    mtu: int
    nameserver: str
    mac: str

    def net_config(self) -> NetConfig:
        return NetConfig(address=self.address, prefix=self.prefix, gateway=self.gateway,
                         mtu=self.mtu)

    def resolv_conf(self) -> str:
        # One server, no search domains (a search list would leak extra lookups, and turn a
        # typo into a query for a name the user never allowed), short timeout: our resolver
        # answers at once or never.
        return f"nameserver {self.nameserver}\noptions timeout:2 attempts:2\n"


def guest_config(a: Addressing) -> GuestConfig:
    return GuestConfig(address=a.guest, prefix=a.prefix, gateway=a.gateway, mtu=a.mtu,
                       nameserver=a.gateway, mac=a.guest_mac)
