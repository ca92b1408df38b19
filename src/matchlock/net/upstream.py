"""Host-side dialling of upstream connections: resolve once, check the address, dial it.

The address that passes `classify_address` is the address dialled (no second lookup, so no
DNS-rebinding window). TLS to the origin is verified against the host's roots plus an optional
extra CA (`--upstream-ca`); a verification failure is an error with its reason, never ignored.
Idle HTTP/1.1 connections are kept in a small per-sandbox pool so a guest that opens a new
connection per request does not cost an upstream handshake each time.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import dns.exception

from matchlock.net.policy import Policy, classify_address
from matchlock.net.streams import Stream

if TYPE_CHECKING:
    import dns.asyncresolver
    import dns.nameserver

CONNECT_TIMEOUT = 10.0
RESOLVE_TIMEOUT = 5.0


class UpstreamError(Exception):
    """Could not reach the origin. `blocked`: refused by policy (private address)."""

    def __init__(self, message: str, *, blocked: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.blocked = blocked


@dataclass(eq=False)
class Connection:
    stream: Stream
    address: str
    alpn: str | None
    key: tuple[str, int, bool] = ("", 0, False)
    idle_since: float = field(default=0.0)


def _parse_server(spec: str) -> dns.nameserver.Do53Nameserver:
    """`IP`, `IP:PORT` or `[IPv6]:PORT`."""
    import dns.nameserver

    if spec.startswith("["):
        host, _, port = spec[1:].partition("]:")
        return dns.nameserver.Do53Nameserver(host, int(port or 53))
    if spec.count(":") == 1:
        host, _, port = spec.partition(":")
        return dns.nameserver.Do53Nameserver(host, int(port))
    return dns.nameserver.Do53Nameserver(spec)


class Upstream:
    def __init__(
        self,
        policy: Policy,
        *,
        upstream_dns: Sequence[str] = (),
        upstream_ca: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        max_idle_per_origin: int = 8,
        idle_timeout: float = 30.0,
    ) -> None:
        self.policy = policy
        self.connect_timeout = connect_timeout
        self._resolver: dns.asyncresolver.Resolver | None = None
        if upstream_dns:
            # dnspython's resolver (~8 ms, ~3 MiB of imports) only for --upstream-dns; the
            # host's own resolver otherwise.
            import dns.asyncresolver

            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [_parse_server(s) for s in upstream_dns]
            self._resolver.lifetime = RESOLVE_TIMEOUT
        self._tls: dict[tuple[str, ...], ssl.SSLContext] = {}
        self._upstream_ca = upstream_ca
        if upstream_ca:
            self._client_context(("http/1.1",))  # fail early on a bad --upstream-ca file
        # Without one, the context (which parses the host's whole root bundle: ~20 ms and
        # ~1 MiB per sandbox) is made by the first TLS connection upstream.
        self._idle: dict[tuple[str, int, bool], list[Connection]] = {}
        self._max_idle = max_idle_per_origin
        self._idle_timeout = idle_timeout

    def _client_context(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        ctx = self._tls.get(alpn)
        if ctx is None:
            ctx = ssl.create_default_context()
            if self._upstream_ca:
                ctx.load_verify_locations(cafile=self._upstream_ca)
            if alpn:
                ctx.set_alpn_protocols(list(alpn))
            self._tls[alpn] = ctx
        return ctx

    # -- resolution ----------------------------------------------------------------------

    async def resolve(self, name: str, port: int) -> list[str]:
        """All addresses of `name` (IPv4 first), from the configured resolver or the host's."""
        try:
            if self._resolver is not None:
                out: list[str] = []
                for rdtype in ("A", "AAAA"):
                    answer = await self._resolver.resolve(name, rdtype, raise_on_no_answer=False)
                    out += [rr.address for rr in answer.rrset or ()]
                    if out:
                        break
            else:
                loop = asyncio.get_running_loop()
                infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
                v4 = [str(i[4][0]) for i in infos if i[0] == socket.AF_INET]
                v6 = [str(i[4][0]) for i in infos if i[0] == socket.AF_INET6]
                out = list(dict.fromkeys(v4 + v6))
        except (OSError, dns.exception.DNSException) as exc:
            raise UpstreamError(f"cannot resolve {name}: {_dns_reason(exc)}") from None
        if not out:
            raise UpstreamError(f"cannot resolve {name}: no addresses")
        return out

    async def addresses(self, name: str | None, address: str, port: int) -> list[str]:
        """The checked addresses to try for a connection, in order."""
        if name is None:
            reason = classify_address(address)
            if reason is not None:
                raise UpstreamError(f"{address} is a {reason} (blocked)", blocked=True)
            return [address]
        pinned = self.policy.pinned(name)
        if pinned is not None:
            return [pinned]  # --add-host: the user chose this address explicitly
        candidates = await self.resolve(name, port)
        if self.policy.private_allowed(name):
            return candidates
        allowed = [a for a in candidates if classify_address(a) is None]
        if not allowed:
            first = candidates[0]
            raise UpstreamError(
                f"{name} resolves to {first}, a {classify_address(first)} (blocked; "
                f"--allow-private-host {name} or --add-host {name}:IP would allow it)",
                blocked=True,
            )
        return allowed

    # -- dialling ------------------------------------------------------------------------

    async def connect(
        self,
        name: str | None,
        address: str,
        port: int,
        *,
        tls: bool,
        alpn: Sequence[str] = (),
    ) -> Connection:
        """A new connection to the origin (resolving and checking first)."""
        errors: list[str] = []
        label = name or address
        loop = asyncio.get_running_loop()
        for candidate in await self.addresses(name, address, port):
            stream = Stream()
            try:
                async with asyncio.timeout(self.connect_timeout):
                    if tls:
                        transport, _ = await loop.create_connection(
                            lambda s=stream: s,  # type: ignore[misc]
                            candidate,
                            port,
                            ssl=self._client_context(tuple(alpn)),
                            server_hostname=name or candidate,
                        )
                    else:
                        transport, _ = await loop.create_connection(
                            lambda s=stream: s,  # type: ignore[misc]
                            candidate,
                            port,
                        )
            except ssl.SSLCertVerificationError as exc:
                raise UpstreamError(
                    f"upstream certificate of {label} failed verification: "
                    f"{exc.verify_message or exc.reason}"
                ) from None
            except ssl.SSLError as exc:
                raise UpstreamError(f"TLS with {label} failed: {exc.reason or exc}") from None
            except TimeoutError:
                errors.append(f"{candidate}: timed out")
                continue
            except OSError as exc:
                errors.append(f"{candidate}: {exc.strerror or exc}")
                continue
            ssl_obj = transport.get_extra_info("ssl_object")
            chosen = ssl_obj.selected_alpn_protocol() if ssl_obj is not None else None
            return Connection(stream, candidate, chosen, (label, port, tls))
        raise UpstreamError(f"cannot connect to {label} port {port} ({'; '.join(errors)})")

    # -- idle pool (HTTP/1.1 only) -------------------------------------------------------

    def take_idle(self, name: str | None, address: str, port: int, tls: bool) -> Connection | None:
        idle = self._idle.get((name or address, port, tls))
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < self._idle_timeout and conn.stream.reusable():
                return conn
            conn.stream.abort()
        return None

    def put_idle(self, conn: Connection) -> None:
        if not conn.stream.reusable():
            conn.stream.abort()
            return
        idle = self._idle.setdefault(conn.key, [])
        conn.idle_since = time.monotonic()
        idle.append(conn)
        while len(idle) > self._max_idle:
            idle.pop(0).stream.abort()

    def close_idle(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.stream.abort()
        self._idle.clear()


def _dns_reason(exc: BaseException) -> str:
    if isinstance(exc, dns.exception.DNSException):
        from dns.resolver import NXDOMAIN  # only with --upstream-dns (dnspython's resolver)

        if isinstance(exc, NXDOMAIN):
            return "no such domain"
    if isinstance(exc, dns.exception.Timeout):
        return "DNS timed out"
    if isinstance(exc, socket.gaierror):
        return exc.strerror or str(exc)
    return str(exc) or type(exc).__name__
