"""The sandbox's resolver: answers from policy and the synthetic map, never upstream.

Rules (docs/network.md, "Names, not addresses"):
- A for an allowed name → its synthetic address, TTL 5 s. AAAA (and any other ordinary type)
  for an allowed name → NOERROR with no records, so clients fall back to IPv4.
- A name that is not allowed, or is not a valid host name → NXDOMAIN, the same answer whether
  or not the name exists (nothing is looked up, so nothing can tell).
- Not class IN, meta types (ANY, AXFR, IXFR), other opcodes, several questions → REFUSED or
  NOTIMP; unparseable → FORMERR; responses and runts → no answer at all.
- `localhost` and `*.localhost` → 127.0.0.1 (RFC 6761); the sandbox's own host name → the
  guest's address (the guest's /etc/hosts normally answers both before us).
Nothing the guest sends is forwarded, so DNS cannot carry data out (tunnelling), whatever the
labels hold. Sizes are bounded here; the packet rate is bounded by the firewall and a token
bucket here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

from matchlock.net.logutil import warn
from matchlock.net.synthetic import SyntheticMap

log = logging.getLogger(__name__)

TTL = 5
MAX_QUERY = 512         # a query is one question; real ones are well under 300 bytes
EDNS_PAYLOAD = 1232     # what we advertise; our answers are tiny anyway
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_HEADER = struct.Struct("!HHHHHH")


class NamePolicy(Protocol):
    """The part of `matchlock.net.policy.Policy` the resolver needs."""

    def name_allowed(self, name: str) -> bool: ...


def valid_hostname(name: str) -> bool:
    """Lower-case, dot-free-at-the-end host name of LDH (and '_') labels, ≤ 253 characters."""
    if not name or len(name) > 253:
        return False
    return all(_LABEL.match(label) for label in name.split("."))


def header_reply(query: bytes, rcode: int) -> bytes:
    """A bare reply (no sections) for a query we could not or would not parse."""
    qid, flags = struct.unpack_from("!HH", query, 0)
    opcode_rd = flags & 0x7900  # opcode and RD, echoed
    return _HEADER.pack(qid, 0x8000 | 0x0080 | opcode_rd | (rcode & 0xF), 0, 0, 0, 0)


def answer(
    query: bytes,
    policy: NamePolicy,
    smap: SyntheticMap,
    *,
    local: Mapping[str, str] | None = None,
) -> bytes | None:
    """The wire-format reply to one wire-format query, or None to stay silent.

    `local` maps extra names (lower-case) to fixed addresses, e.g. the sandbox's host name.
    """
    if len(query) < _HEADER.size or len(query) > MAX_QUERY:
        return None
    if query[2] & 0x80:
        return None  # a response: answering it could start a loop
    # The parser (dnspython: ~30 ms of imports and ~3 MiB per owner process) is loaded by the
    # first query, not when the sandbox starts: most sandboxes never resolve a name.
    from matchlock.net.dnsanswer import respond

    return respond(query, policy, smap, local or {})


# --- serving ----------------------------------------------------------------------------------


class TokenBucket:
    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens = burst
        self._stamp = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


Responder = Callable[[bytes], "bytes | None"]


class DnsDatagramProtocol(asyncio.DatagramProtocol):
    """UDP/53 on the gateway address; one datagram in, at most one out."""

    def __init__(self, respond: Responder, bucket: TokenBucket | None = None) -> None:
        self._respond = respond
        self._bucket = bucket or TokenBucket(rate=500, burst=1000)
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if self._transport is None or not self._bucket.take():
            return
        try:
            reply = self._respond(data)
        except Exception as e:
            warn(log, "dns", "DNS responder failed", e)
            return
        if reply is not None:
            self._transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("DNS socket error: %s", exc)


class DnsStreamServer:
    """DNS over TCP (RFC 7766 framing): bounded connections, queries and idle time."""

    def __init__(
        self,
        respond: Responder,
        *,
        max_connections: int = 16,
        max_queries: int = 64,
        idle_timeout: float = 10.0,
    ) -> None:
        self._respond = respond
        self._slots = asyncio.Semaphore(max_connections)
        self._max_queries = max_queries
        self._idle = idle_timeout

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._slots.locked():
            writer.close()
            return
        async with self._slots:
            try:
                for _ in range(self._max_queries):
                    head = await asyncio.wait_for(reader.readexactly(2), self._idle)
                    (length,) = struct.unpack("!H", head)
                    if length > MAX_QUERY:
                        break
                    data = await asyncio.wait_for(reader.readexactly(length), self._idle)
                    reply = self._respond(data)
                    if reply is None:
                        break
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                pass
            except Exception as e:
                warn(log, "dns-tcp", "DNS over TCP failed", e)
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
