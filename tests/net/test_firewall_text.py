"""The nftables ruleset as text, and the other pure helpers."""

from __future__ import annotations

import socket
import struct

import pytest

from matchlock.net.addressing import Addressing, guest_config
from matchlock.net.firewall import COUNTERS, DnsLimit, ruleset
from matchlock.net.origdst import parse_sockaddr_in


def rules() -> list[str]:
    return [line.strip() for line in ruleset("tap0", Addressing()).splitlines()]


def test_all_guest_tcp_is_dnat_to_the_proxy() -> None:
    assert ('iifname "tap0" meta nfproto ipv4 meta l4proto tcp counter name "tcp_proxy" '
            "dnat ip to 10.213.0.1:15001") in rules()


def test_filter_order_tcp_then_dns_then_drops() -> None:
    r = rules()
    start = r.index("type filter hook prerouting priority raw; policy accept;")
    chain = r[start + 1 : r.index("}", start)]
    assert chain == [
        'iifname != "tap0" accept',
        'ip saddr != 10.213.0.2 counter name "spoofed" drop',
        "meta nfproto ipv4 meta l4proto tcp accept",
        'ip daddr 10.213.0.1 udp dport 53 limit rate 200/second burst 400 packets '
        'counter name "dns" accept',
        'ip daddr 10.213.0.1 udp dport 53 counter name "dns_limited" drop',
        'meta l4proto udp counter name "udp_drop" drop',
        'meta l4proto icmp counter name "icmp_drop" drop',
        'counter name "other_drop" drop',
    ]


def test_input_and_forward_default_drop() -> None:
    r = rules()
    assert "type filter hook input priority filter; policy drop;" in r
    assert "type filter hook forward priority filter; policy drop;" in r
    assert 'iifname "tap0" ip daddr 10.213.0.1 tcp dport 15001 ct status dnat accept' in r


def test_every_counter_is_declared_and_used() -> None:
    text = ruleset("tap0", Addressing())
    for name in COUNTERS:
        assert f"counter {name} {{ }}" in text
        assert f'counter name "{name}"' in text


def test_interface_and_limits_are_parameters() -> None:
    text = ruleset("veth7", Addressing(), DnsLimit(per_second=5, burst=6), max_connections=7)
    assert 'meta l4proto tcp ct state new ct count over 7 counter name "conn_limit" drop' in text
    assert '"tap0"' not in text and 'iifname "veth7"' in text
    assert "limit rate 5/second burst 6 packets" in text
    assert not text.startswith("table inet matchlock\ndelete")
    assert ruleset("tap0", Addressing(), replace=True).startswith(
        "table inet matchlock\ndelete table inet matchlock\n")
    for bad in ("", "tap0; drop", 'a"b', "x" * 16):
        with pytest.raises(ValueError):
            ruleset(bad, Addressing())
    with pytest.raises(ValueError):
        ruleset("tap0", Addressing(), max_connections=0)


def test_addressing_is_checked_and_gives_the_guest_config() -> None:
    cfg = guest_config(Addressing())
    assert (cfg.address, cfg.prefix, cfg.gateway, cfg.mtu, cfg.nameserver) == (
        "10.213.0.2", 24, "10.213.0.1", 1500, "10.213.0.1")
    assert cfg.net_config().encode() == bytes([10, 213, 0, 2, 24, 10, 213, 0, 1, 0, 0, 5, 220])
    assert cfg.resolv_conf().startswith("nameserver 10.213.0.1\n")
    with pytest.raises(ValueError):
        Addressing(guest="10.214.0.2")
    with pytest.raises(ValueError):
        Addressing(gateway="198.18.0.1", guest="198.18.0.2")


def test_parse_sockaddr_in() -> None:
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 8443) + bytes([192, 0, 2, 10])
    assert parse_sockaddr_in(raw + bytes(8)) == ("192.0.2.10", 8443)
    with pytest.raises(ValueError):
        parse_sockaddr_in(raw[:6])
    with pytest.raises(ValueError):
        parse_sockaddr_in(struct.pack("=H", socket.AF_INET6) + bytes(14))
