"""SandboxNetwork end to end with real namespaces, nftables and packets (no VM)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from matchlock.net import firewall
from matchlock.net.netns import SandboxNetns
from matchlock.net.stack import SandboxNetwork
from matchlock.net.target import Target
from tests.net.netenv import (
    AllowList,
    Env,
    interfaces,
    needs_root,
    sandbox_env,
    veth_into,
    wait_for,
)

pytestmark = [needs_root, pytest.mark.timeout(60)]

GW = "10.213.0.1"


@pytest.fixture
def env() -> Iterator[Env]:
    with sandbox_env(AllowList("allowed.test", "*.npm.test", "github.test")) as e:
        yield e


def query(env: Env, name: str, rdtype: str = "A", *, tcp: bool = False,
          server: str = GW) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    if tcp:
        with env.guest_socket() as s:
            s.connect((server, 53))
            return dns.query.tcp(q, server, timeout=2, sock=s)
    with env.guest_socket(socket.SOCK_DGRAM) as s:
        return dns.query.udp(q, server, timeout=2, sock=s)


def a_record(m: dns.message.Message) -> str:
    assert m.rcode() == dns.rcode.NOERROR
    (rrset,) = m.answer
    assert rrset.rdtype == dns.rdatatype.A and rrset.ttl == 5
    return str(next(iter(rrset)))


def connect(env: Env, address: str, port: int) -> tuple[str, socket.socket]:
    s = env.guest_socket()
    s.connect((address, port))
    line = s.makefile("rb").readline().decode().strip()
    return line, s


# --- DNS ------------------------------------------------------------------------------------


def test_allowed_name_gets_a_stable_synthetic_address(env: Env) -> None:
    first = a_record(query(env, "allowed.test"))
    assert first.startswith("198.1")
    assert a_record(query(env, "ALLOWED.test")) == first
    assert a_record(query(env, "allowed.test", tcp=True)) == first
    other = a_record(query(env, "registry.npm.test"))
    assert other != first


def test_aaaa_is_empty_and_denied_names_are_nxdomain(env: Env) -> None:
    aaaa = query(env, "allowed.test", "AAAA")
    assert aaaa.rcode() == dns.rcode.NOERROR and aaaa.answer == []
    assert query(env, "denied.test").rcode() == dns.rcode.NXDOMAIN
    assert query(env, "denied.test", "AAAA").rcode() == dns.rcode.NXDOMAIN
    assert query(env, "npm.test").rcode() == dns.rcode.NXDOMAIN  # apex not covered by *.
    assert len(env.net.smap) == 0


def test_tunnelling_and_odd_queries_get_nothing_useful(env: Env) -> None:
    secret = "c2VjcmV0LWRhdGEtZXhmaWx0cmF0aW9u" * 1
    assert query(env, f"{secret}.denied.test", "TXT").rcode() == dns.rcode.NXDOMAIN
    assert query(env, "allowed.test", "ANY").rcode() == dns.rcode.REFUSED
    txt = query(env, "allowed.test", "TXT")
    assert txt.rcode() == dns.rcode.NOERROR and txt.answer == []


def test_localhost_and_own_hostname(env: Env) -> None:
    assert a_record(query(env, "localhost")) == "127.0.0.1"
    assert a_record(query(env, "sbx")) == "10.213.0.2"


def test_busybox_nslookup_in_the_guest(env: Env) -> None:
    ok = env.guest_run(["busybox", "nslookup", "-type=a", "allowed.test", GW])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "198.18.0." in ok.stdout
    bad = env.guest_run(["busybox", "nslookup", "-type=a", "denied.test", GW])
    assert "NXDOMAIN" in bad.stdout + bad.stderr


def test_dns_to_another_resolver_is_dropped(env: Env) -> None:
    before = env.counters()["udp_drop"]
    with pytest.raises((dns.exception.Timeout, TimeoutError)):
        query(env, "allowed.test", server="198.18.0.53")
    assert env.counters()["udp_drop"] == before + 1


def test_dns_rate_is_bounded_in_the_kernel() -> None:
    with sandbox_env(AllowList("allowed.test"), dns_limit=firewall.DnsLimit(10, 20)) as env:
        wire = dns.message.make_query("allowed.test", "A").to_wire()
        with env.guest_socket(socket.SOCK_DGRAM, timeout=0.5) as s:
            for _ in range(200):
                s.sendto(wire, (GW, 53))
            replies = 0
            try:
                while True:
                    s.recv(512)
                    replies += 1
            except TimeoutError:
                pass
        assert 20 <= replies < 60
        assert env.counters()["dns_limited"] >= 140


# --- TCP -------------------------------------------------------------------------------------


def test_tcp_to_a_synthetic_address_carries_the_name(env: Env) -> None:
    address = a_record(query(env, "github.test"))
    line, s = connect(env, address, 22)
    with s:
        assert line == f"github.test|{address}|22"
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
    target = env.targets.get(timeout=2)
    assert (target.name, target.address, target.port) == ("github.test", address, 22)


def test_tcp_to_any_other_address_and_port_reaches_the_proxy_without_a_name(env: Env) -> None:
    for address, port in [(GW, 80), (GW, 8443), ("198.19.200.1", 443)]:
        line, s = connect(env, address, port)
        s.close()
        assert line == f"None|{address}|{port}"
    assert env.counters()["tcp_proxy"] == 3


def test_the_proxy_port_itself_is_not_reachable_directly(env: Env) -> None:
    # Not DNAT-ed (the tuple would not change), so there would be no original destination.
    s = env.guest_socket(timeout=1)
    with s, pytest.raises((TimeoutError, ConnectionRefusedError)):
        s.connect((GW, 15001))
        s.recv(1)


def test_connections_pin_their_name(env: Env) -> None:
    address = a_record(query(env, "allowed.test"))
    _, s = connect(env, address, 443)
    with s:
        assert env.net.active_connections == 1
        assert env.net.smap._by_name["allowed.test"].pins == 1
    assert wait_for(lambda: env.net.active_connections == 0)
    assert env.net.smap._by_name["allowed.test"].pins == 0


# --- drops -------------------------------------------------------------------------------------


def test_udp_elsewhere_is_dropped_without_reply(env: Env) -> None:
    before = env.counters()["udp_drop"]
    with env.guest_socket(socket.SOCK_DGRAM, timeout=0.5) as s:
        s.sendto(b"hello", (GW, 9999))
        s.sendto(b"hello", ("198.18.0.7", 443))
        with pytest.raises(TimeoutError):
            s.recv(100)
    assert env.counters()["udp_drop"] == before + 2


def test_icmp_is_dropped(env: Env) -> None:
    before = env.counters()["icmp_drop"]
    r = env.guest_run(["busybox", "ping", "-c", "1", "-W", "1", GW])
    assert r.returncode != 0
    assert env.counters()["icmp_drop"] >= before + 1


def test_spoofed_source_is_dropped(env: Env) -> None:
    env.guest.run(["ip", "addr", "add", "10.213.0.9/24", "dev", "eth0"], check=True)
    s = env.guest_socket(timeout=1)
    s.bind(("10.213.0.9", 0))
    with s, pytest.raises(TimeoutError):
        s.connect((GW, 80))
    assert env.counters()["spoofed"] >= 1


def test_ipv6_is_disabled_in_the_sandbox(env: Env) -> None:
    with env.net.netns.enter(), open("/proc/sys/net/ipv6/conf/all/disable_ipv6") as f:
        assert f.read().strip() == "1"
    out = env.net.netns.run(["ip", "-6", "addr"], capture_output=True, text=True).stdout
    assert out.strip() == ""
    # Even a guest that has IPv6 gets nowhere with it.
    with env.guest.enter():
        for conf in ("all", "eth0"):
            with open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w") as f:
                f.write("0")
    env.guest.run(["ip", "addr", "add", "fd00::2/64", "dev", "eth0", "nodad"], check=True)
    s = env.guest.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(1)
    with s, pytest.raises((TimeoutError, OSError)):
        s.connect(("fd00::1", 80))
    assert env.targets.empty()


def test_nothing_is_forwarded(env: Env) -> None:
    assert env.counters()["forward_drop"] == 0
    with env.net.netns.enter(), open("/proc/sys/net/ipv4/ip_forward") as f:
        assert f.read().strip() == "0"


# --- lifecycle -------------------------------------------------------------------------------


def test_tap_mode_configures_the_gateway() -> None:
    net = SandboxNetwork()
    net.start(AllowList(), _never)
    try:
        assert net.tap_fd >= 0
        out = net.netns.run(["ip", "-o", "-4", "addr", "show", "tap0"], capture_output=True,
                            text=True).stdout
        assert "10.213.0.1/24" in out
        link = net.netns.run(["ip", "-o", "link", "show", "tap0"], capture_output=True,
                             text=True).stdout
        assert "mtu 1500" in link and "02:6d:6c:00:00:01" in link
        assert "tap0" not in {n for _, n in socket.if_nameindex()}
        assert net.qemu_args() == [
            "-netdev", f"tap,id=n0,fd={net.tap_fd}",
            "-device", "virtio-net-device,netdev=n0,mac=02:6d:6c:00:00:02",
        ]
        cfg = net.guest_config()
        assert (cfg.address, cfg.prefix, cfg.gateway, cfg.mtu, cfg.nameserver) == (
            "10.213.0.2", 24, GW, 1500, GW)
    finally:
        net.close()


def test_close_removes_the_namespace_and_start_close_are_fast() -> None:
    starts, closes = [], []
    for _ in range(5):
        guest = SandboxNetns()
        try:
            net = SandboxNetwork(iface="gw0", link_factory=veth_into(guest))
            net.start(AllowList(), _never)
            assert "eth0" in interfaces(guest)
            net.close()
            starts.append(net.timings["start"])
            closes.append(net.timings["close"])
            # The veth dies with the sandbox's namespace, taking the guest's end with it.
            assert wait_for(lambda g=guest: "eth0" not in interfaces(g))  # type: ignore[misc]
        finally:
            guest.close()
    assert sorted(starts)[2] < 0.05, starts
    assert sorted(closes)[2] < 0.02, closes


async def _never(*args: object) -> None:
    raise AssertionError("no connection expected")


def test_concurrent_guest_connections_are_capped_in_the_kernel() -> None:
    with sandbox_env(AllowList(), max_connections=3) as env:
        held = [connect(env, GW, 80 + i)[1] for i in range(3)]
        s = env.guest_socket(timeout=0.5)
        with s, pytest.raises(TimeoutError):
            s.connect((GW, 90))
        assert env.counters()["conn_limit"] >= 1
        for h in held:
            h.close()
        # Closed connections stop counting.
        assert wait_for(lambda: _can_connect(env), timeout=5)


def _can_connect(env: Env) -> bool:
    try:
        line, s = connect(env, GW, 91)
    except OSError:
        return False
    s.close()
    return line == f"None|{GW}|91"


def test_raw_socket_handler_can_peek_before_reading() -> None:
    guest = SandboxNetns()
    net = SandboxNetwork(iface="gw0", link_factory=veth_into(guest))

    async def on_socket(sock: socket.socket, target: Target) -> None:
        # What the proxy does with a ClientHello: look first, decide, then read.
        loop = asyncio.get_running_loop()
        while not (_readable(sock) and len(sock.recv(16, socket.MSG_PEEK)) >= 5):
            await asyncio.sleep(0.01)
        data = await loop.sock_recv(sock, 16)
        await loop.sock_sendall(sock, data.upper() + f" {target.name}".encode())
        sock.close()

    try:
        net.start(AllowList("allowed.test"), on_socket=on_socket)
        env = Env(net=net, guest=guest)
        address = a_record(query(env, "allowed.test"))
        with env.guest_socket() as s:
            s.connect((address, 443))
            s.sendall(b"hello")
            assert s.recv(64) == b"HELLO allowed.test"
        with pytest.raises(TypeError):
            SandboxNetwork().start(AllowList())
    finally:
        net.close(wait=True)
        guest.close()


def _readable(sock: socket.socket) -> bool:
    import select

    return bool(select.select([sock], [], [], 0)[0])
