"""Raw TCP: bytes spliced to name:port without inspection of the protocol.

Raw means what it says: the proxy does not parse what is relayed, so neither the Host check
nor secret substitution can apply. That is why raw is only for ports the user named
(`--allow-host host:port`; `Decision.raw`), never for the default web ports, and why two
guards still watch what the guest sends:

- the classifier, on the first bytes a guest sends after a silence: unless the server has
  really spoken first (SMTP, MySQL, …: no HTTP or TLS server does), TLS or HTTP sent after
  a pause is refused, it would bypass the SNI/Host checks;
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

    __slots__ = ("_gating", "_scanner", "_server")

    def __init__(self, gate: bool, scanner: PlaceholderScanner | None, server: Stream) -> None:
        self._gating = gate
        self._scanner = scanner
        self._server = server

    def __call__(self, data: bytes) -> str | None:
        if self._gating and self._server.received:
            self._gating = False  # a real server-speaks-first protocol: what follows is its own
        if self._gating:
            kind = classify(data)
            if kind == "more":
                return "more"
            if kind != "raw":
                return f"{kind} sent after the server spoke first (bypasses the SNI/Host checks)"
            self._gating = False
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
    from matchlock.net.proxy import Blocked, reset_socket, stream_from

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
    try:
        up_bytes, down_bytes = await splice(guest, up.stream, guard)
    except Refused as exc:
        proxy.block_event(target, Blocked(0, str(exc)), protocol="tcp")
        guest.reset()
        up.stream.reset()
        return
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
