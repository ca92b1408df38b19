"""Test plumbing: a SandboxNetwork whose "guest" is a veth end in a second namespace.

A TAP without a VMM has no peer to send from, so these tests replace it with a veth pair: the
sandbox's end carries the gateway address and the firewall, the other end sits in a "guest"
namespace configured like the agent would configure eth0. Every packet stays inside these two
test namespaces: the sandbox namespace has no uplink.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from matchlock.net import firewall, link
from matchlock.net.netns import SandboxNetns
from matchlock.net.stack import LinkFactory, SandboxNetwork
from matchlock.net.target import Target

SANDBOX_IF = "gw0"
GUEST_IF = "eth0"


def have_privileges() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun")


needs_root = pytest.mark.skipif(not have_privileges(), reason="needs root and /dev/net/tun")


class AllowList:
    """Stands in for matchlock.net.policy.Policy: exact names and '*.suffix' globs."""

    def __init__(self, *patterns: str) -> None:
        self.patterns = {p.lower() for p in patterns}

    def name_allowed(self, name: str) -> bool:
        if "*" in self.patterns or name in self.patterns:
            return True
        return any(p.startswith("*.") and name.endswith(p[1:]) for p in self.patterns)


def veth_into(guest: SandboxNetns) -> LinkFactory:
    """A link factory: veth pair, sandbox end `gw0`, guest end `eth0` configured as by the
    agent (address, MTU, default route via the gateway)."""

    def make(ns: SandboxNetns, iface: str) -> None:
        # Runs with this thread inside the sandbox's namespace: `ip` is created there.
        subprocess.run(
            ["ip", "link", "add", iface, "type", "veth", "peer", "name", GUEST_IF,
             "netns", guest.path],
            check=True, capture_output=True,
        )
        with guest.enter():
            link.set_ipv4(GUEST_IF, "10.213.0.2", 24)
            link.set_up(GUEST_IF)
            subprocess.run(["ip", "route", "add", "default", "via", "10.213.0.1"],
                           check=True, capture_output=True)
        return None

    return make


def interfaces(ns: SandboxNetns) -> set[str]:
    with ns.enter():
        return {name for _, name in socket.if_nameindex()}


def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


@dataclass
class Env:
    net: SandboxNetwork
    guest: SandboxNetns
    targets: queue.Queue[Target] = field(default_factory=queue.Queue)

    def counters(self) -> dict[str, int]:
        return firewall.counters(self.net.netns)

    def guest_socket(self, kind: int = socket.SOCK_STREAM, timeout: float = 2.0) -> socket.socket:
        s = self.guest.socket(socket.AF_INET, kind)
        s.settimeout(timeout)
        return s

    def guest_run(self, argv: list[str], timeout: float = 10) -> subprocess.CompletedProcess[str]:
        return self.guest.run(argv, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def sandbox_env(policy: AllowList, **kwargs: object) -> Iterator[Env]:
    guest = SandboxNetns()
    net = SandboxNetwork(iface=SANDBOX_IF, link_factory=veth_into(guest), hostname="sbx",
                         **kwargs)  # type: ignore[arg-type]
    env = Env(net=net, guest=guest)

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            target: Target) -> None:
        # Echo the target back so the guest side can see what the host saw.
        env.targets.put(target)
        writer.write(f"{target.name}|{target.address}|{target.port}\n".encode())
        await writer.drain()
        data = await reader.read(65536)
        while data:
            writer.write(data)
            await writer.drain()
            data = await reader.read(65536)

    try:
        net.start(policy, on_connection)
        yield env
    finally:
        net.close(wait=True)
        guest.close()
