"""The egress policy: which host names and ports a sandbox may reach (pure, no I/O).

Grammar of an allow-list entry (`--allow-host`, comma-separated, repeatable):

    PATTERN[:PORT]   PATTERN = `*` | NAME-GLOB

- Without `:PORT` an entry allows ports 80 and 443; with it, only that port.
- `*` alone is open mode: any name on any port (and, for connections the guest opened by
  address, any public address). `*:PORT` opens one port for any name.
- `*.example.com` matches every subdomain at any depth, never the apex `example.com`.
- A `*` inside a label (`api-*.example.com`) matches within that one label only, so it can
  never cross a dot into a domain the user did not name. The last label (the TLD) cannot hold
  a wildcard: `example.*` would allow any domain anywhere.
- IP literals are refused: connections are matched by the name the guest resolved through the
  sandbox's DNS (docs/network.md), so an address pattern could never match anything.

An empty allow-list denies everything (the reference allowed everything: a known flaw).

Rules are kept in an immutable tuple that is swapped under a lock on change, so the readers on
the hot path (every request) never take a lock.
"""

from __future__ import annotations

import ipaddress
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORTS = frozenset({80, 443})
# A range, not a frozenset: 65,535 int objects in a set cost ~4 MiB in every owner process.
ALL_PORTS = range(1, 65536)
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_GLOB_LABEL = re.compile(r"^[a-z0-9_*-]{1,63}$")
_PORT = re.compile(r"^[0-9]{1,5}$")
MAX_NAME = 253


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    rule: str | None = None
    # May bytes that are neither TLS nor HTTP be spliced to this port uninspected? Only where
    # the user named the port (`host:port`, or `*` beyond 80/443): on the default web ports
    # raw TCP would be a way around the SNI/Host checks.
    raw: bool = False


def normalize_name(name: str) -> str | None:
    """Lower-case `name` without a trailing dot, or None if it is not a valid DNS host name."""
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > MAX_NAME or not name.isascii():
        return None
    for label in name.split("."):
        if not _LABEL.match(label):
            return None
    return name


class HostGlob:
    """A host name glob (see the module doc); matching is case-insensitive."""

    __slots__ = ("_regex", "text")

    def __init__(self, text: str) -> None:
        pattern = text.strip().lower()
        if pattern.endswith("."):
            pattern = pattern[:-1]
        self.text = pattern
        if pattern == "*":
            self._regex = None
            return
        _reject_address(text, pattern)
        if not pattern:
            raise ValueError("empty host pattern")
        if not pattern.isascii():
            raise ValueError(f"{text!r}: non-ASCII host names must be given in punycode (xn--…)")
        if len(pattern) > MAX_NAME:
            raise ValueError(f"{text!r}: host name longer than {MAX_NAME} characters")
        labels = pattern.split(".")
        parts: list[str] = []
        for i, label in enumerate(labels):
            if "*" not in label:
                if not _LABEL.match(label):
                    raise ValueError(f"{text!r}: invalid label {label!r} in host name")
                parts.append(re.escape(label))
                continue
            if not _GLOB_LABEL.match(label) or "**" in label:
                raise ValueError(f"{text!r}: invalid wildcard label {label!r}")
            if i == len(labels) - 1:
                raise ValueError(
                    f"{text!r}: a wildcard in the last label would match any domain; "
                    "name the domain (e.g. '*.example.com')"
                )
            if label == "*":
                # Leading `*.` = one or more labels (any depth); elsewhere exactly one label.
                parts.append(r"(?:[^.]+\.)*[^.]+" if i == 0 else r"[^.]+")
            else:
                parts.append("[^.]*".join(re.escape(p) for p in label.split("*")))
        self._regex = re.compile(r"\.".join(parts) + r"\Z", re.ASCII)

    @property
    def is_any(self) -> bool:
        return self._regex is None

    def matches(self, name: str) -> bool:
        """`name` must already be normalized (see `normalize_name`)."""
        return self._regex is None or self._regex.match(name) is not None


def _reject_address(text: str, pattern: str) -> None:
    candidate = pattern[1:-1] if pattern.startswith("[") and pattern.endswith("]") else pattern
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return
    raise ValueError(
        f"{text!r}: IP addresses cannot be allow-listed; allow the host name instead "
        "(connections are matched by the name the sandbox resolved), or use '*' for open mode"
    )


@dataclass(frozen=True, slots=True)
class Rule:
    """One allow-list entry: a host glob and the ports it opens."""

    text: str
    host: HostGlob
    ports: frozenset[int] | range
    explicit_port: bool = False  # `HOST:PORT`, as opposed to a bare pattern's default ports

    @property
    def is_open(self) -> bool:
        return self.host.is_any

    def raw_allowed(self, port: int) -> bool:
        """Did the user open `port` for more than HTTP and TLS? (See Decision.raw.)"""
        if self.explicit_port:
            return True
        return self.is_open and port not in DEFAULT_PORTS

    def __str__(self) -> str:
        return self.text


def parse_rule(spec: str) -> Rule:
    """Parse one `PATTERN[:PORT]` entry; ValueError with a message for the CLI if it is bad."""
    raw = spec.strip()
    if not raw:
        raise ValueError("empty --allow-host entry")
    if raw.count(":") > 1 or raw.startswith("["):
        raise ValueError(
            f"{spec!r}: expected HOST or HOST:PORT (IPv6 addresses cannot be allow-listed)"
        )
    host_text, _, port_text = raw.partition(":")
    host = HostGlob(host_text)
    if port_text or raw.endswith(":"):
        if not _PORT.match(port_text) or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{spec!r}: port must be a number from 1 to 65535")
        ports: frozenset[int] | range = frozenset({int(port_text)})
        text = f"{host.text}:{int(port_text)}"
    else:
        ports = ALL_PORTS if host.is_any else DEFAULT_PORTS
        text = host.text
    return Rule(text=text, host=host, ports=ports, explicit_port=bool(port_text))


def split_specs(values: Iterable[str]) -> list[str]:
    """Flatten repeatable, comma-separated CLI values; blank items are ignored."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def parse_add_host(spec: str) -> tuple[str, str]:
    """`--add-host HOST:IP` → (normalized host, address). IPv6 addresses may follow the colon."""
    host, sep, address = spec.strip().partition(":")
    name = normalize_name(host) if sep else None
    if name is None:
        raise ValueError(f"{spec!r}: expected --add-host HOST:IP with a valid host name")
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        raise ValueError(f"{spec!r}: {address!r} is not an IP address") from None
    return name, str(ip)


class Policy:
    """Allow-list, private-address exceptions and pinned addresses of one sandbox."""

    def __init__(
        self,
        allow: Iterable[str] = (),
        *,
        allow_private: Iterable[str] = (),
        add_hosts: Iterable[str] = (),
    ) -> None:
        self._lock = threading.Lock()
        self._rules: tuple[Rule, ...] = ()
        self.add(allow)
        private: list[HostGlob] = []
        for spec in split_specs(allow_private):
            if ":" in spec:
                raise ValueError(f"{spec!r}: --allow-private-host takes a host pattern, no port")
            private.append(HostGlob(spec))
        self._private = tuple(private)
        pins: dict[str, str] = {}
        for spec in add_hosts:
            name, address = parse_add_host(spec)
            pins[name] = address
        self._pins = pins

    # -- runtime changes (allow-list add|delete) ------------------------------------------

    def add(self, patterns: Iterable[str]) -> list[str]:
        """Add entries (validated all-or-nothing); returns the ones that were new."""
        parsed = [parse_rule(spec) for spec in split_specs(patterns)]
        with self._lock:
            known = {rule.text for rule in self._rules}
            added = []
            for rule in parsed:
                if rule.text not in known:
                    known.add(rule.text)
                    added.append(rule)
            self._rules = (*self._rules, *added)
        return [rule.text for rule in added]

    def remove(self, patterns: Iterable[str]) -> list[str]:
        """Remove entries by their normalized text; returns the ones that were present."""
        texts = {parse_rule(spec).text for spec in split_specs(patterns)}
        with self._lock:
            removed = [rule.text for rule in self._rules if rule.text in texts]
            self._rules = tuple(rule for rule in self._rules if rule.text not in texts)
        return removed

    @property
    def rules(self) -> tuple[str, ...]:
        return tuple(rule.text for rule in self._rules)

    # -- queries (hot path, lock-free) ----------------------------------------------------

    def check(self, name: str, port: int) -> Decision:
        """May a connection or request go to `name`:`port`?"""
        rules = self._rules
        norm = normalize_name(name)
        if norm is None:
            return Decision(False, f"{name!r} is not a valid host name")
        if not rules:
            return Decision(False, "the allow-list is empty: all egress is denied")
        other_port: Rule | None = None
        allowed: Rule | None = None
        for rule in rules:
            if rule.host.matches(norm):
                if port in rule.ports:
                    if rule.raw_allowed(port):
                        return Decision(
                            True, f"allowed by --allow-host {rule.text}", rule.text, raw=True
                        )
                    allowed = allowed or rule
                else:
                    other_port = other_port or rule
        if allowed is not None:
            return Decision(True, f"allowed by --allow-host {allowed.text}", allowed.text)
        if other_port is not None:
            return Decision(
                False,
                f"port {port} is not allowed for {norm} (--allow-host {other_port.text} allows "
                f"port {', '.join(str(p) for p in sorted(other_port.ports))}; "
                f"add {norm}:{port} to allow it)",
            )
        return Decision(False, f"{norm} is not in the allow-list (no --allow-host entry matches)")

    def check_address(self, address: str, port: int) -> Decision:
        """A connection the guest opened by address (not through the sandbox's DNS)."""
        for rule in self._rules:
            if rule.is_open and port in rule.ports:
                return Decision(
                    True, f"open mode (--allow-host {rule.text})", rule.text,
                    raw=rule.raw_allowed(port),
                )
        return Decision(
            False,
            f"connections by address are refused: {address} did not come from the sandbox's "
            "DNS (only --allow-host '*' allows them)",
        )

    def name_allowed(self, name: str) -> bool:
        """Is `name` allowed on any port? (The DNS resolver answers only for these.)"""
        norm = normalize_name(name)
        return norm is not None and any(rule.host.matches(norm) for rule in self._rules)

    def private_allowed(self, name: str) -> bool:
        norm = normalize_name(name)
        return norm is not None and any(glob.matches(norm) for glob in self._private)

    def pinned(self, name: str) -> str | None:
        norm = normalize_name(name)
        return None if norm is None else self._pins.get(norm)


# -- addresses that must never be dialled --------------------------------------------------

_V4_BLOCKED: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), reason)
    for net, reason in (
        ("169.254.169.254/32", "cloud metadata endpoint"),
        ("100.100.100.200/32", "cloud metadata endpoint"),
        ("0.0.0.0/8", "unspecified/'this network' address"),
        ("10.0.0.0/8", "private address (RFC 1918)"),
        ("100.64.0.0/10", "carrier-grade NAT address (RFC 6598)"),
        ("127.0.0.0/8", "loopback address"),
        ("169.254.0.0/16", "link-local address"),
        ("172.16.0.0/12", "private address (RFC 1918)"),
        ("192.0.0.0/24", "IETF protocol assignment (RFC 6890)"),
        ("192.0.2.0/24", "documentation address (RFC 5737)"),
        ("192.88.99.0/24", "6to4 relay anycast address"),
        ("192.168.0.0/16", "private address (RFC 1918)"),
        ("198.18.0.0/15", "benchmarking address (RFC 2544)"),
        ("198.51.100.0/24", "documentation address (RFC 5737)"),
        ("203.0.113.0/24", "documentation address (RFC 5737)"),
        ("224.0.0.0/4", "multicast address"),
        ("240.0.0.0/4", "reserved address"),
    )
)

_V6_BLOCKED: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), reason)
    for net, reason in (
        ("fd00:ec2::254/128", "cloud metadata endpoint"),
        ("::/128", "unspecified address"),
        ("::1/128", "loopback address"),
        ("::/96", "IPv4-compatible address (deprecated)"),
        ("64:ff9b:1::/48", "local-use NAT64 address"),
        ("100::/64", "discard-only address"),
        ("2001::/23", "IETF protocol assignment (incl. Teredo)"),
        ("2001:db8::/32", "documentation address"),
        ("3fff::/20", "documentation address"),
        ("5f00::/16", "segment-routing address"),
        ("fc00::/7", "unique local address (ULA)"),
        ("fe80::/10", "link-local address"),
        ("fec0::/10", "site-local address (deprecated)"),
        ("ff00::/8", "multicast address"),
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_6TO4 = ipaddress.IPv6Network("2002::/16")


def classify_address(address: str) -> str | None:
    """Why `address` must not be dialled from the host, or None if it is a public address.

    IPv6 forms that embed an IPv4 address (IPv4-mapped, NAT64, 6to4) are judged by the IPv4
    address they lead to. Anything Python does not consider global is blocked as a fallback,
    so a range missing from the tables fails closed.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded: ipaddress.IPv4Address | None = ip.ipv4_mapped
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is None and ip in _6TO4:
            embedded = ip.sixtofour
        if embedded is not None:
            inner = classify_address(str(embedded))
            return None if inner is None else f"{inner} (embedded in IPv6 {ip})"
        for net6, reason in _V6_BLOCKED:
            if ip in net6:
                return reason
    else:
        for net4, reason in _V4_BLOCKED:
            if ip in net4:
                return reason
    if not ip.is_global:
        return "non-public address"
    if str(ip) in local_addresses():
        # A public address of this very host: its own services are not "the internet".
        return "address of the sandbox host itself"
    return None


_LOCAL_TTL_S = 2.0
_local_cache: tuple[float, frozenset[str]] = (0.0, frozenset())


def local_addresses() -> frozenset[str]:
    """Addresses assigned to the host's interfaces (of the calling thread's namespace),
    re-read every couple of seconds so a new or changed address is covered."""
    global _local_cache
    now = time.monotonic()
    stamp, cached = _local_cache
    if now - stamp < _LOCAL_TTL_S:
        return cached
    found: set[str] = set()
    try:
        last = ""
        for line in Path("/proc/thread-self/net/fib_trie").read_text().splitlines():
            text = line.strip()
            if text.startswith(("|--", "+--")):
                last = text[3:].strip()
            elif text.endswith("host LOCAL") and last:
                found.add(last)
    except OSError:
        pass
    try:
        for line in Path("/proc/thread-self/net/if_inet6").read_text().splitlines():
            raw = line.split()[0]
            found.add(str(ipaddress.IPv6Address(int(raw, 16))))
    except (OSError, ValueError, IndexError):
        pass
    result = frozenset(found)
    _local_cache = (now, result)
    return result
