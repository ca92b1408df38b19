"""Synthetic addresses: one per host name, so a TCP connection maps back to its name.

The sandbox's resolver answers every allowed name with an address from 198.18.0.0/15 (RFC 2544
benchmarking, never routed). When the guest connects to it, the proxy gets the name back here.

Reuse rules, because a wrong name for an address would send a connection to the wrong host:
- A name keeps its address while it is in the map (stable per sandbox).
- The map is bounded. When full, the least recently used name is evicted, but only if it is
  not pinned by an open connection and has been idle (not looked up, not connected to) for at
  least `idle_before_evict` seconds, far longer than the 5 s DNS TTL and than what
  TTL-ignoring resolver caches (JVM 30 s, browsers 60 s) hold. If nothing may be evicted, the
  lookup fails rather than recycle an address that might still be in use.
- Freed addresses go to the back of a FIFO, and fresh addresses are used first, so an address
  is re-assigned as late as possible (with the defaults, after 65,534 other assignments).
Names are case-insensitive (stored lower-case, without a trailing dot).
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from matchlock.net.addressing import SYNTHETIC_NET

DEFAULT_CAPACITY = 65536
DEFAULT_IDLE_BEFORE_EVICT = 600.0


def normalize_name(name: str) -> str:
    return name.rstrip(".").lower()


def is_synthetic(address: str) -> bool:
    try:
        return ipaddress.IPv4Address(address) in SYNTHETIC_NET
    except ValueError:
        return False


@dataclass
class _Entry:
    address: int
    last_used: float
    pins: int = 0


class SyntheticMap:
    """Thread-safe, bounded name ⇄ address map for one sandbox."""

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        idle_before_evict: float = DEFAULT_IDLE_BEFORE_EVICT,
        network: ipaddress.IPv4Network = SYNTHETIC_NET,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Skip the network's first and last address; some stacks treat them specially.
        self._first = int(network.network_address) + 1
        self._last = int(network.broadcast_address) - 1
        pool = self._last - self._first + 1
        if not 0 < capacity <= pool:
            raise ValueError(f"capacity must be 1..{pool}")
        self._capacity = capacity
        self._idle = idle_before_evict
        self._clock = clock
        self._lock = threading.Lock()
        self._by_name: dict[str, _Entry] = {}
        self._by_addr: dict[int, str] = {}
        # Unpinned names, least recently used first. Pinned names are not evictable and are
        # kept out of it, so eviction only ever looks at its head.
        self._lru: OrderedDict[str, None] = OrderedDict()
        self._next_fresh = self._first
        self._freed: deque[int] = deque()

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_name)

    @property
    def capacity(self) -> int:
        return self._capacity

    def address_for(self, name: str) -> str | None:
        """The name's address, assigning one if needed; None when the map is full of names
        that may still be in use."""
        key = normalize_name(name)
        if not key:
            raise ValueError("empty name")
        with self._lock:
            now = self._clock()
            entry = self._by_name.get(key)
            if entry is None:
                addr = self._allocate(now)
                if addr is None:
                    return None
                entry = _Entry(address=addr, last_used=now)
                self._by_name[key] = entry
                self._by_addr[addr] = key
                self._lru[key] = None
            else:
                self._touch(key, entry, now)
            return str(ipaddress.IPv4Address(entry.address))

    def name_for(self, address: str) -> str | None:
        """The name an address was handed out for (counts as a use), or None."""
        addr = self._parse(address)
        if addr is None:
            return None
        with self._lock:
            key = self._by_addr.get(addr)
            if key is not None:
                self._touch(key, self._by_name[key], self._clock())
            return key

    def pin(self, address: str) -> str | None:
        """Mark the address as used by an open connection (never evicted until `unpin`);
        returns its name, or None (and pins nothing) when the address is not ours."""
        addr = self._parse(address)
        if addr is None:
            return None
        with self._lock:
            key = self._by_addr.get(addr)
            if key is None:
                return None
            entry = self._by_name[key]
            entry.pins += 1
            entry.last_used = self._clock()
            self._lru.pop(key, None)
            return key

    def unpin(self, address: str) -> None:
        addr = self._parse(address)
        if addr is None:
            return
        with self._lock:
            key = self._by_addr.get(addr)
            if key is None:
                return
            entry = self._by_name[key]
            if entry.pins <= 0:
                raise RuntimeError(f"unpin of an address that is not pinned: {address}")
            entry.pins -= 1
            entry.last_used = self._clock()
            if entry.pins == 0:
                self._lru[key] = None

    # --- internals (lock held) -------------------------------------------------------------

    def _touch(self, key: str, entry: _Entry, now: float) -> None:
        entry.last_used = now
        if entry.pins == 0:
            self._lru.move_to_end(key)

    def _allocate(self, now: float) -> int | None:
        if len(self._by_name) >= self._capacity and not self._evict_one(now):
            return None
        if self._next_fresh <= self._last:
            addr = self._next_fresh
            self._next_fresh += 1
            return addr
        if self._freed:
            return self._freed.popleft()
        return None  # unreachable while capacity <= pool size

    def _evict_one(self, now: float) -> bool:
        if not self._lru:
            return False
        key = next(iter(self._lru))
        entry = self._by_name[key]
        if now - entry.last_used < self._idle:
            return False
        del self._lru[key]
        del self._by_name[key]
        del self._by_addr[entry.address]
        self._freed.append(entry.address)
        return True

    def _parse(self, address: str) -> int | None:
        try:
            value = int(ipaddress.IPv4Address(address))
        except ValueError:
            return None
        return value if self._first <= value <= self._last else None
