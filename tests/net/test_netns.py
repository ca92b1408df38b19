"""SandboxNetns and the TAP: real namespaces; nothing outlives its owner."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from matchlock.net.netns import SandboxNetns
from matchlock.net.tap import IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, create_tap, tap_flags
from tests.net.netenv import interfaces, needs_root, wait_for

pytestmark = [needs_root, pytest.mark.timeout(60)]
REPO = Path(__file__).resolve().parents[2]


def this_thread_ns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def add_probe(ns: SandboxNetns, probe: SandboxNetns, name: str = "probe0") -> None:
    """A veth pair with one end in `ns` and the other in `probe`: the probe end vanishes
    exactly when `ns` is destroyed, which is how these tests see a namespace die."""
    ns.run(["ip", "link", "add", "inner0", "type", "veth", "peer", "name", name,
            "netns", probe.path], check=True)
    assert name in interfaces(probe)


def test_enter_moves_only_the_calling_thread_and_back() -> None:
    host = this_thread_ns()
    with SandboxNetns() as ns:
        seen: list[int] = []
        with ns.enter():
            assert this_thread_ns() == ns.inode != host
            t = threading.Thread(target=lambda: seen.append(this_thread_ns()))
            t.start()
            t.join()
        assert this_thread_ns() == host
        # A thread started inside enter() inherits the namespace (so the network loop thread
        # must be started outside it).
        assert seen == [ns.inode]


def test_lo_is_up_and_ipv6_off_inside_only() -> None:
    path = "/proc/sys/net/ipv6/conf/all/disable_ipv6"
    host_value = Path(path).read_text()
    with SandboxNetns() as ns:
        with ns.enter():
            assert Path(path).read_text().strip() == "1"
            assert Path("/proc/sys/net/ipv6/conf/default/disable_ipv6").read_text().strip() == "1"
        out = ns.run(["ip", "-o", "addr", "show", "lo"], capture_output=True, text=True).stdout
        assert "127.0.0.1/8" in out and "::1" not in out
        assert interfaces(ns) == {"lo"}
        assert ns.run(["ip", "-o", "link", "show", "lo"], capture_output=True,
                      text=True).stdout.count("UP") >= 1
    assert Path(path).read_text() == host_value


def test_socket_belongs_to_the_namespace() -> None:
    host = socket.socket()
    host.bind(("127.0.0.1", 0))
    host.listen()
    with host, SandboxNetns() as ns:
        inside = ns.socket()
        with inside, pytest.raises(ConnectionRefusedError):
            inside.connect(host.getsockname())  # a different loopback


def test_namespace_dies_with_its_last_reference() -> None:
    with SandboxNetns() as probe:
        ns = SandboxNetns()
        add_probe(ns, probe)
        keeper = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        ns.close()
        # Still referenced by the socket.
        assert not wait_for(lambda: "probe0" not in interfaces(probe), timeout=0.3)
        keeper.close()
        assert wait_for(lambda: "probe0" not in interfaces(probe))


def test_tap_is_created_inside_with_vnet_header() -> None:
    with SandboxNetns() as ns:
        fd = create_tap(ns, "tap0")
        try:
            assert tap_flags(fd) & (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) == (
                IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            assert "tap0" in interfaces(ns)
            assert "tap0" not in {n for _, n in socket.if_nameindex()}
        finally:
            os.close(fd)
        assert wait_for(lambda: "tap0" not in interfaces(ns))


CHILD = r"""
import ctypes, signal, subprocess, sys
from matchlock.net.stack import SandboxNetwork
from tests.net.netenv import AllowList

async def handler(r, w, t):
    pass

net = SandboxNetwork()  # a real TAP, as for a VM
net.start(AllowList("x.test"), handler)
# The parent's probe sees this veth end vanish when our namespace dies.
net.netns.run(["ip", "link", "add", "inner0", "type", "veth", "peer", "name", "probe0",
               "netns", sys.argv[1]], check=True)

def tie():
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)

# Stands in for the VMM: spawned inside the namespace, holding the TAP fd, tied to us with
# PR_SET_PDEATHSIG like vm/qemu.py does.
with net.netns.enter():
    vmm = subprocess.Popen(["sleep", "600"], preexec_fn=tie, pass_fds=(net.tap_fd,))
print(vmm.pid, flush=True)
signal.pause()
"""


def test_sigkill_of_the_owner_leaks_nothing() -> None:
    with SandboxNetns() as probe:
        child = subprocess.Popen([sys.executable, "-c", CHILD, probe.path], cwd=REPO,
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            vmm_pid = int(child.stdout.readline())
            assert "probe0" in interfaces(probe)
            child.send_signal(signal.SIGKILL)
            child.wait()
            assert wait_for(lambda: not _alive(vmm_pid))
            # The sandbox's namespace is gone: its veth end died, and with it ours.
            assert wait_for(lambda: "probe0" not in interfaces(probe))
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False
