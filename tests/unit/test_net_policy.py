"""Allow-list grammar and matching, runtime changes, and the blocked-address table."""

from __future__ import annotations

import threading
import time

import pytest

from matchlock.net.policy import Policy, classify_address, parse_add_host, parse_rule


def test_empty_allow_list_denies_everything() -> None:
    policy = Policy()
    decision = policy.check("example.com", 443)
    assert not decision.allowed and "empty" in decision.reason
    assert not policy.name_allowed("example.com")


def test_exact_name_default_ports() -> None:
    policy = Policy(["api.openai.com"])
    assert policy.check("api.openai.com", 443).allowed
    assert policy.check("API.OpenAI.com.", 80).allowed  # case and trailing dot
    assert policy.check("api.openai.com", 443).rule == "api.openai.com"
    denied = policy.check("api.openai.com", 22)
    assert (
        not denied.allowed and "port 22" in denied.reason and "api.openai.com:22" in denied.reason
    )
    assert not policy.check("openai.com", 443).allowed
    assert not policy.check("xapi.openai.com", 443).allowed
    assert not policy.check("api.openai.com.evil.com", 443).allowed


def test_explicit_port_only_that_port() -> None:
    policy = Policy(["github.com:22"])
    assert policy.check("github.com", 22).allowed
    assert not policy.check("github.com", 443).allowed
    assert policy.name_allowed("github.com")


def test_subdomain_wildcard_excludes_apex() -> None:
    policy = Policy(["*.pkgs.example"])
    assert policy.check("mirror.pkgs.example", 443).allowed
    assert policy.check("a.b.pkgs.example", 443).allowed
    assert not policy.check("pkgs.example", 443).allowed
    assert not policy.check("evilpkgs.example", 443).allowed
    assert not policy.check("pkgs.example.evil.com", 443).allowed


def test_wildcard_inside_label_stays_in_label() -> None:
    policy = Policy(["api-*.example.com"])
    assert policy.check("api-v1.example.com", 443).allowed
    assert policy.check("api-.example.com", 443).allowed is False  # not a valid name
    assert not policy.check("api-x.evil.example.com", 443).allowed
    assert not policy.check("api-x.evil.com", 443).allowed


def test_open_mode() -> None:
    policy = Policy(["*"])
    assert policy.check("anything.example", 443).allowed
    assert policy.check("anything.example", 5432).allowed
    assert policy.check_address("93.184.216.34", 443).allowed
    assert not Policy(["example.com"]).check_address("93.184.216.34", 443).allowed
    one_port = Policy(["*:22"])
    assert one_port.check("x.example", 22).allowed and not one_port.check("x.example", 443).allowed


def test_open_mode_covers_exactly_the_tcp_ports() -> None:
    # `*` opens every port from 1 to 65535 (a range since it stopped being a 4 MiB set).
    policy = Policy(["*"])
    for port in (1, 22, 65535):
        assert policy.check("x.example", port).allowed
        assert policy.check_address("93.184.216.34", port).allowed
    for port in (0, 65536, -1):
        assert not policy.check("x.example", port).allowed
        assert not policy.check_address("93.184.216.34", port).allowed


@pytest.mark.parametrize(
    "spec",
    [
        "",
        ":",
        "example.com:",
        "example.com:0",
        "example.com:65536",
        "example.com:http",
        "1.2.3.4",
        "[::1]",
        "::1",
        "1.2.3.4:80",
        "example.*",
        "*.*",
        "a..b",
        "-a.com",
        "exa mple.com",
        "ex\u00e4mple.com",
        "a**.b.com",
        "a.com:22:33",
        "x" * 64 + ".com",
        "a_b.*.com:99999",
    ],
)
def test_bad_patterns_are_rejected(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_rule(spec)


def test_error_messages_explain() -> None:
    with pytest.raises(ValueError, match="IP addresses cannot be allow-listed"):
        parse_rule("10.0.0.1")
    with pytest.raises(ValueError, match="last label"):
        parse_rule("example.*")
    with pytest.raises(ValueError, match="port must be"):
        parse_rule("example.com:99999")


def test_comma_separated_and_dedup() -> None:
    policy = Policy(["a.com,b.com", "a.com", " c.com:8080 "])
    assert policy.rules == ("a.com", "b.com", "c.com:8080")


def test_runtime_add_remove() -> None:
    policy = Policy(["a.com"])
    assert policy.add(["b.com,a.com"]) == ["b.com"]
    assert policy.check("b.com", 443).allowed
    assert policy.remove(["A.com", "zzz.com"]) == ["a.com"]
    assert not policy.check("a.com", 443).allowed
    assert policy.remove(["b.com"]) == ["b.com"]
    assert not policy.check("b.com", 443).allowed  # removing all denies all (not allow all)
    with pytest.raises(ValueError):
        policy.add(["ok.com", "1.2.3.4"])
    assert policy.rules == ()  # all-or-nothing


def test_runtime_changes_are_thread_safe() -> None:
    policy = Policy(["base.com"])

    def churn(i: int) -> None:
        for j in range(200):
            policy.add([f"h{i}-{j}.com"])
            assert policy.check("base.com", 443).allowed
            policy.remove([f"h{i}-{j}.com"])

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert policy.rules == ("base.com",)


def test_private_and_pins() -> None:
    policy = Policy(
        ["x.com"],
        allow_private=["*.corp.example,db.local"],
        add_hosts=["x.com:10.0.0.5", "v6.example:fd00::1"],
    )
    assert policy.private_allowed("a.corp.example") and policy.private_allowed("DB.local")
    assert not policy.private_allowed("corp.example")
    assert policy.pinned("X.COM") == "10.0.0.5"
    assert policy.pinned("v6.example") == "fd00::1"
    assert policy.pinned("y.com") is None
    with pytest.raises(ValueError):
        parse_add_host("x.com")
    with pytest.raises(ValueError):
        parse_add_host("x.com:not-an-ip")
    with pytest.raises(ValueError):
        Policy(allow_private=["a.com:22"])


def test_invalid_names_never_match() -> None:
    policy = Policy(["*"])
    assert not policy.check("bad name", 443).allowed
    assert not policy.check("a" * 300, 443).allowed
    assert not policy.check("", 443).allowed


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.1.2.3",
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "169.254.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "100.127.255.255",
        "0.0.0.0",
        "0.1.2.3",
        "224.0.0.1",
        "239.255.255.250",
        "255.255.255.255",
        "240.0.0.1",
        "198.18.0.1",
        "198.19.255.255",
        "192.0.2.1",
        "198.51.100.7",
        "203.0.113.9",
        "192.0.0.170",
        "::",
        "::1",
        "fe80::1",
        "fc00::1",
        "fd00:ec2::254",
        "ff02::1",
        "2001:db8::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::a00:1",
        "2002:7f00:1::",
        "2002:a9fe:a9fe::1",
        "fe80::1%eth0",
        "100::1",
        "3fff::1",
        "::127.0.0.1",
        "fec0::1",
        "not-an-ip",
    ],
)
def test_blocked_addresses(address: str) -> None:
    assert classify_address(address) is not None


@pytest.mark.parametrize(
    "address",
    [
        "93.184.216.34",
        "8.8.8.8",
        "1.1.1.1",
        "2606:4700:4700::1111",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "172.32.0.1",
        "100.128.0.1",
        "198.20.0.1",
    ],
)
def test_public_addresses(address: str) -> None:
    assert classify_address(address) is None


def test_reasons_are_specific() -> None:
    assert classify_address("169.254.169.254") == "cloud metadata endpoint"
    assert classify_address("127.0.0.1") == "loopback address"
    assert "loopback" in (classify_address("::ffff:127.0.0.1") or "")
    assert classify_address("100.64.1.1") == "carrier-grade NAT address (RFC 6598)"


def test_the_hosts_own_public_addresses_are_blocked(monkeypatch: pytest.MonkeyPatch) -> None:
    from matchlock.net import policy

    monkeypatch.setattr(policy, "_local_cache", (time.monotonic(), frozenset({"8.8.4.4"})))
    assert policy.classify_address("8.8.4.4") == "address of the sandbox host itself"
    assert policy.classify_address("8.8.8.8") is None


def test_local_addresses_include_loopback() -> None:
    from matchlock.net import policy

    assert "127.0.0.1" in policy.local_addresses()
