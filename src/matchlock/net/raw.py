"""Raw TCP: bytes spliced to name:port without inspection of the protocol.

Raw means what it says: the proxy does not parse what is relayed, so neither the Host check
nor secret substitution can apply. That is why raw is only for ports the user named
(`--allow-host host:port`; `Decision.raw`), never for the default web ports, and why two
guards still watch what the guest sends:

- the classifier, on the first line of a guest that was silent or sent something too short to
  classify before pausing: the bytes are forwarded as they come while the line stays
  undecided (a prefix such as `GET` is no request to any origin), and the connection is
  refused the moment it turns into TLS or HTTP, before the deciding bytes are forwarded;
  unless the server has really spoken first (SMTP, MySQL, …: no HTTP or TLS server does),
  after which what the guest sends is that protocol's own;
- a placeholder scanner for the whole stream: a secret's placeholder in raw bytes is headed
  somewhere it can neither be substituted nor checked, so the connection is refused.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import TYPE_CHECKING

from matchlock.net.audit import AuditEvent
from matchlock.net.classify import classify
from matchlock.net.masking import PlaceholderScanner
from matchlock.net.policy import Decision
from matchlock.net.streams import Refused, Stream, splice
from matchlock.net.target import Target
from matchlock.net.upstream import UpstreamError

if TYPE_CHECKING:
    from matchlock.net.proxy import Proxy


class RawGuard:
    """The guard of the guest→upstream direction (streams.Guard)."""

    __slots__ = ("_gating", "_line", "_scanner", "_server")

    def __init__(self, gate: bool, scanner: PlaceholderScanner | None, server: Stream) -> None:
        self._gating = gate
        self._line = b""  # what the guest sent while its first line is undecided
        self._scanner = scanner
        self._server = server

    def __call__(self, data: bytes) -> str | None:
        if self._gating and not self._line and self._server.received:
            # The server spoke before the guest said anything: a real server-speaks-first
            # protocol, and what follows is its own. (Answers to the guest's own first bytes
            # do not count.)
            self._gating = False
        if self._gating:
            self._line += data
            kind = classify(self._line)
            if kind in ("tls", "h2", "http"):
                return f"{kind} after a pause, the server silent (bypasses the SNI/Host checks)"
            if kind == "raw":
                self._gating, self._line = False, b""
        if self._scanner is not None:
            name = self._scanner.feed(data)
            if name is not None:
                return (
                    f"secret placeholder of {name} in raw TCP (not HTTP, so it can be neither "
                    "substituted nor checked)"
                )
        return None


async def relay_raw(
    proxy: Proxy,
    sock: socket.socket,
    target: Target,
    decision: Decision,
    owned: list[Stream],
    *,
    gate: bool,
) -> None:
    """Splice the guest's connection to name:port, if the policy allows raw TCP there.
    `gate`: the guest was silent so far (server speaks first); see RawGuard."""
    from matchlock.net.proxy import Blocked, Tunnel, reset_socket, stream_from

    if not decision.allowed or not decision.raw:
        reason = decision.reason if not decision.allowed else (
            f"only HTTP and TLS may go to port {target.port} (raw TCP needs the port named "
            f"explicitly: --allow-host {target.name or target.address}:{target.port})"
        )
        proxy.block_event(target, Blocked(0, reason, decision.rule), protocol="tcp")
        reset_socket(sock)
        return
    started = time.perf_counter()
    try:
        up = await proxy.upstream.connect(target.name, target.address, target.port, tls=False)
    except UpstreamError as exc:
        proxy.block_event(target, Blocked(0, exc.message), protocol="tcp")
        reset_socket(sock)
        return
    guest = await stream_from(sock)
    owned += (guest, up.stream)
    host = target.name or target.address
    proxy.audit(
        AuditEvent(host=host, port=target.port, action="allow", reason=decision.reason,
                   protocol="tcp")
    )
    scanner = proxy.secrets.scanner()
    guard = RawGuard(gate, scanner, up.stream) if gate or scanner is not None else None
    if not proxy.tunnel_opened(guest, Tunnel(target, target.name, raw=True, upstream=up.stream)):
        proxy.block_event(target, Blocked(0, "allow-list changed while connecting"),
                          protocol="tcp")
        guest.reset()
        up.stream.abort()
        return
    try:
        up_bytes, down_bytes = await splice(guest, up.stream, guard)
    except Refused as exc:
        proxy.block_event(target, Blocked(0, str(exc)), protocol="tcp")
        guest.reset()
        up.stream.reset()
        return
    finally:
        proxy.tunnel_closed(guest)
    await asyncio.gather(guest.close(), up.stream.close())
    proxy.audit(
        AuditEvent(
            host=host,
            port=target.port,
            action="allow",
            reason="connection closed",
            protocol="tcp",
            bytes_up=up_bytes,
            bytes_down=down_bytes,
            duration_ms=(time.perf_counter() - started) * 1000,
        )
    )
