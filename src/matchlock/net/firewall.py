"""The sandbox namespace's nftables ruleset (docs/network.md, Topology).

`ruleset()` is pure text so it can be reviewed and unit-tested; `load()` applies it inside a
namespace through libnftables (in-process, ~0.5 ms) and falls back to running `nft -f -`
(~3-40 ms of fork/exec on these machines) when the library is missing.

What the guest can do, in rule order (everything is matched on the guest's interface only):
- any IPv4 TCP → DNAT to the proxy listener (except TCP to the resolver's own port 53);
- UDP to the resolver's port 53 → accepted, rate-limited in the kernel;
- everything else (other UDP, other DNS servers, ICMP, IPv6, spoofed sources) → dropped.
Nothing is ever forwarded: the namespace has no other interface and `forward` drops anyway.
Each verdict has a named counter so tests and diagnostics can see drops.
"""

from __future__ import annotations

import ctypes
import json
import re
import subprocess
import threading
from dataclasses import dataclass

from matchlock.net.addressing import Addressing
from matchlock.net.netns import SandboxNetns

TABLE = "matchlock"

# Named counters, one per verdict.
COUNTERS = (
    "tcp_proxy",   # guest TCP connections DNAT-ed to the proxy (counts the first packet)
    "dns",         # guest DNS packets to the resolver (UDP)
    "dns_tcp",     # guest DNS connections to the resolver (TCP, first packet)
    "dns_limited", # DNS packets over the rate limit
    "conn_limit",  # new TCP connections beyond the concurrent-connection cap
    "spoofed",     # IPv4 from the guest with a source address that is not the guest's
    "udp_drop",    # other UDP, including DNS to any other server
    "icmp_drop",
    "other_drop",  # IPv6 and anything else
    "input_drop",
    "forward_drop",
)

_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


@dataclass(frozen=True)
class DnsLimit:
    """Kernel-side rate limit for guest DNS packets (UDP) and new DNS connections (TCP)."""

    per_second: int = 200
    burst: int = 400


DEFAULT_MAX_CONNECTIONS = 1024


def ruleset(
    iface: str,
    a: Addressing,
    dns_limit: DnsLimit | None = None,
    *,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    replace: bool = False,
) -> str:
    """The nft script for a sandbox whose guest is behind `iface` (tap0, or a veth in tests).

    `max_connections` caps the guest's concurrent TCP connections in the kernel. Conntrack's
    table is shared by every namespace on the host, so without it one guest flooding SYNs
    could fill it and break NAT for all other sandboxes.

    A fresh namespace has no table; `replace=True` makes the script atomically replace an
    existing one instead. Not the default: deleting a table makes the kernel wait for an RCU
    grace period, 3-20 ms here, against ~0.3 ms for the whole load without it.
    """
    if not _IFNAME.match(iface):
        raise ValueError(f"invalid interface name {iface!r}")
    if max_connections < 1:
        raise ValueError("max_connections must be positive")
    lim = dns_limit or DnsLimit()
    gw, guest = a.gateway, a.guest
    limit = f"limit rate {lim.per_second}/second burst {lim.burst} packets"
    tcp53 = f"ip daddr {gw} tcp dport {a.dns_port}"
    dnat = f"dnat ip to {gw}:{a.proxy_port}"
    conn_cap = f"ct state new ct count over {max_connections}"
    counters = "\n".join(f"  counter {name} {{ }}" for name in COUNTERS)
    # `table X; delete table X` replaces the table in the same transaction as the new rules.
    prologue = f"table inet {TABLE}\ndelete table inet {TABLE}\n" if replace else ""
    return prologue + f"""\
table inet {TABLE} {{
{counters}

  # Runs before conntrack and NAT: decide what the guest may send at all.
  chain guest_filter {{
    type filter hook prerouting priority raw; policy accept;
    iifname != "{iface}" accept
    ip saddr != {guest} counter name "spoofed" drop
    meta nfproto ipv4 meta l4proto tcp accept
    ip daddr {gw} udp dport {a.dns_port} {limit} counter name "dns" accept
    ip daddr {gw} udp dport {a.dns_port} counter name "dns_limited" drop
    meta l4proto udp counter name "udp_drop" drop
    meta l4proto icmp counter name "icmp_drop" drop
    counter name "other_drop" drop
  }}

  # After conntrack (priority -200), before NAT: a cap on concurrent guest connections.
  chain guest_conn {{
    type filter hook prerouting priority mangle; policy accept;
    iifname "{iface}" meta l4proto tcp {conn_cap} counter name "conn_limit" drop
  }}

  # Every other guest TCP connection, whatever its address and port, goes to the proxy,
  # which learns the original destination from SO_ORIGINAL_DST.
  chain guest_nat {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "{iface}" {tcp53} {limit} counter name "dns_tcp" accept
    iifname "{iface}" {tcp53} drop
    iifname "{iface}" meta nfproto ipv4 meta l4proto tcp counter name "tcp_proxy" {dnat}
  }}

  chain input {{
    type filter hook input priority filter; policy drop;
    iifname "lo" accept
    # Only DNAT-ed connections reach the proxy: a guest dialling 10.213.0.1:{a.proxy_port}
    # itself is not DNAT-ed (same tuple) and is dropped, so every accepted connection has a
    # meaningful original destination.
    iifname "{iface}" ip daddr {gw} tcp dport {a.proxy_port} ct status dnat accept
    iifname "{iface}" ip daddr {gw} udp dport {a.dns_port} accept
    iifname "{iface}" ip daddr {gw} tcp dport {a.dns_port} ct status != dnat accept
    counter name "input_drop"
  }}

  chain forward {{
    type filter hook forward priority filter; policy drop;
    counter name "forward_drop"
  }}
}}
"""


class FirewallError(RuntimeError):
    pass


class _LibNft:
    """The few libnftables calls we need, via ctypes (python3-nftables is not on PyPI)."""

    OUTPUT_JSON = 1 << 4

    def __init__(self) -> None:
        # By soname: ctypes.util.find_library would cost an `ldconfig -p` run and 12 ms of imports.
        lib = ctypes.CDLL("libnftables.so.1")
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        self._lib = lib
        # libnftables keeps some process-global state; one command at a time.
        self._lock = threading.Lock()

    def run(self, script: str, *, json_output: bool = False) -> str:
        """Run an nft script in the calling thread's network namespace; returns its output."""
        lib = self._lib
        with self._lock:
            ctx = lib.nft_ctx_new(0)
            if not ctx:
                raise FirewallError("nft_ctx_new failed")
            try:
                lib.nft_ctx_buffer_output(ctx)
                lib.nft_ctx_buffer_error(ctx)
                if json_output:
                    lib.nft_ctx_output_set_flags(ctx, self.OUTPUT_JSON)
                rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
                out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode()
                err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode()
            finally:
                lib.nft_ctx_free(ctx)
        if rc != 0:
            raise FirewallError(f"nft failed: {err.strip() or rc}")
        return out


_libnft: _LibNft | None = None
_libnft_lock = threading.Lock()


def _lib() -> _LibNft | None:
    global _libnft
    with _libnft_lock:
        if _libnft is None:
            try:
                _libnft = _LibNft()
            except (OSError, AttributeError):
                return None
        return _libnft


def apply(script: str, *, json_output: bool = False, use_library: bool = True) -> str:
    """Run an nft script in the calling thread's namespace (call inside `enter()`)."""
    lib = _lib() if use_library else None
    if lib is not None:
        return lib.run(script, json_output=json_output)
    argv = ["nft", *(["-j"] if json_output else []), "-f", "-"]
    try:
        r = subprocess.run(argv, input=script.encode(), capture_output=True, timeout=30)
    except FileNotFoundError:
        raise FirewallError("nft not found (install the nftables package)") from None
    if r.returncode != 0:
        raise FirewallError(f"nft failed: {r.stderr.decode(errors='replace').strip()}")
    return r.stdout.decode()


def run_nft(ns: SandboxNetns, script: str, *, json_output: bool = False,
            use_library: bool = True) -> str:
    """Run an nft script inside `ns`."""
    with ns.enter():
        return apply(script, json_output=json_output, use_library=use_library)


def load(ns: SandboxNetns, iface: str, a: Addressing, dns_limit: DnsLimit | None = None, *,
         max_connections: int = DEFAULT_MAX_CONNECTIONS, replace: bool = False,
         use_library: bool = True) -> None:
    script = ruleset(iface, a, dns_limit, max_connections=max_connections, replace=replace)
    run_nft(ns, script, use_library=use_library)


def counters(ns: SandboxNetns) -> dict[str, int]:
    """Packets seen by each named counter of the sandbox's table."""
    out = run_nft(ns, f"list counters table inet {TABLE}", json_output=True)
    result: dict[str, int] = {}
    for item in json.loads(out).get("nftables", []):
        c = item.get("counter")
        if isinstance(c, dict) and c.get("table") == TABLE:
            result[str(c["name"])] = int(c["packets"])
    return result
