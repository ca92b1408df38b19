"""Loopback test rig for the egress proxy: a test CA, origin servers and the proxy in a thread.

Everything listens on 127.0.0.1 only. The origins are deliberately naive and independent of
the code under test (they do not use matchlock's parsers).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from matchlock.net.audit import MemorySink
from matchlock.net.certs import CertificateAuthority
from matchlock.net.hookrun import Hooks
from matchlock.net.policy import Policy
from matchlock.net.proxy import Proxy, serve
from matchlock.net.secrets import SecretSet
from matchlock.net.target import Target
from matchlock.net.upstream import Upstream

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class OriginCA:
    """A test CA standing in for the public roots, and origin certificates it issues."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "origin test CA")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = tmp / "origin-ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def server_context(self, names: list[str]) -> ssl.SSLContext:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
            .sign(self.key, hashes.SHA256())
        )
        stem = self.tmp / f"origin-{names[0]}"
        cert_file, key_file = stem.with_suffix(".crt"), stem.with_suffix(".key")
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_file, key_file)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx


@dataclass
class Seen:
    """A request as the origin received it."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    tls: bool


@dataclass
class Origin:
    """Naive HTTP/1.1 origin: /echo, /sse, /chunked, /big, /ws (WebSocket echo), /status/N."""

    tls: ssl.SSLContext | None
    seen: list[Seen] = field(default_factory=list)
    sse_sent: list[float] = field(default_factory=list)
    port: int = 0

    async def start(self) -> None:
        server = await asyncio.start_server(self._conn, "127.0.0.1", 0, ssl=self.tls)
        self.port = server.sockets[0].getsockname()[1]
        self.server = server

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        body = b""
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                body += await reader.readexactly(size)
                await reader.readexactly(2)
        self.seen.append(Seen(method, target, headers, body, self.tls is not None))
        path = target.split("?")[0]
        if path == "/sse":
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            for i in range(4):
                data = f"data: event {i}\n\n".encode()
                writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                await writer.drain()
                self.sse_sent.append(time.monotonic())
                await asyncio.sleep(0.2)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        if path == "/chunked":
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: yes\r\n\r\n"
            )
            await writer.drain()
            return True
        if path.startswith("/big/"):
            n = int(path.split("/")[2])
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
            block = bytes(range(256)) * 256
            left = n
            while left:
                chunk = block[: min(left, len(block))]
                writer.write(chunk)
                left -= len(chunk)
                await writer.drain()
            return True
        if path == "/sneaky-close":  # keep-alive response, then the origin drops the connection
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            return False
        if path == "/close":  # body delimited by close
            writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
            await writer.drain()
            return False
        if path == "/gzip":  # compressed whatever the request asked for
            import gzip

            data = gzip.compress(b"a secret body")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
            await writer.drain()
            return True
        if path == "/sse-echo":  # the Authorization value in a data line, split mid-value
            value = headers.get("authorization", "").encode("latin-1")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            half = len(value) // 2
            for piece in (b"data: " + value[:half], value[half:] + b"\n\n"):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                await asyncio.sleep(0.05)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        if path == "/echo-header":  # the Authorization value back as a response header
            value = headers.get("authorization", "").encode("latin-1")
            writer.write(b"HTTP/1.1 200 OK\r\nX-Echo: %s\r\nContent-Length: 2\r\n\r\nok"
                         % value)
            await writer.drain()
            return True
        if path.startswith("/status/"):
            code = int(path.split("/")[2])
            writer.write(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n\r\n" % code)
            await writer.drain()
            return True
        echo = headers.get("authorization", "").encode("latin-1")
        if path == "/echo-split":  # the Authorization value back, one byte per chunk
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(len(echo)):
                writer.write(b"1;ext=%s\r\n%s\r\n" % (echo, echo[i : i + 1]))
                if i % 3 == 0:
                    await writer.drain()
                    await asyncio.sleep(0.001)
            writer.write(b"0\r\nX-Echo-Trailer: %s\r\n\r\n" % echo)
            await writer.drain()
            return True
        if path == "/hints":  # 103 Early Hints echoing the value, then the response
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: <%s>\r\n\r\n" % echo)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            return True
        if path == "/ws" and headers.get("upgrade", "").lower() == "websocket":
            accept = base64.b64encode(
                hashlib.sha1((headers["sec-websocket-key"] + WS_GUID).encode()).digest()
            )
            extra = b""
            if "sec-websocket-extensions" in headers:
                extra = b"X-Offered-Extensions: " + headers["sec-websocket-extensions"].encode()
                extra += b"\r\n"
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n"
                + (b"X-Echo: %s\r\n" % echo if echo else b"") + extra + b"\r\n"
            )
            if echo and headers.get("x-ws-echo-auth"):
                # The value as one message in two fragments with a ping (itself carrying
                # the value) between them: the client joins the fragments, not the ping.
                half = len(echo) // 2
                writer.write(bytes([0x01, half]) + echo[:half])
                writer.write(bytes([0x89, len(echo)]) + echo)
                writer.write(bytes([0x80, len(echo) - half]) + echo[half:])
            await writer.drain()
            await _ws_echo(reader, writer)
            return False
        payload = json.dumps(
            {
                "method": method,
                "target": target,
                "headers": headers,
                "body": body.decode("latin-1"),
                "tls": self.tls is not None,
            }
        ).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        await writer.drain()
        return headers.get("connection", "").lower() != "close"


async def _ws_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo unfragmented WebSocket frames back unmasked; stop on close."""
    while True:
        b0, b1 = await reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(await reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await reader.readexactly(8), "big")
        mask = await reader.readexactly(4) if b1 & 0x80 else b"\0\0\0\0"
        data = bytes(c ^ mask[i % 4] for i, c in enumerate(await reader.readexactly(n)))
        opcode = b0 & 0x0F
        if n < 126:
            head = bytes([b0, n])
        elif n < 65536:
            head = bytes([b0, 126]) + n.to_bytes(2, "big")
        else:
            head = bytes([b0, 127]) + n.to_bytes(8, "big")
        writer.write(head + data)
        await writer.drain()
        if opcode == 8:
            return


async def tcp_echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def tcp_greeter_server() -> tuple[asyncio.Server, int]:
    """Speaks first (as SMTP does), then echoes."""

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 greeter ready\r\n")
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


class LenientOrigin:
    """Python's http.server (lenient: repeated whitespace, tabs, HTTP/0.9) with name-based
    virtual hosts: answers with the Host it routed by, and logs every request it served."""

    def __init__(self) -> None:
        import http.server

        self.served: list[str] = []
        served = self.served

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                vhost = self.headers.get("Host", "default")
                served.append(vhost)
                body = f"vhost={vhost}\n".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class TestDNS(asyncio.DatagramProtocol):
    """A tiny authoritative-only resolver for `upstream_dns`: name → IPv4 address."""

    def __init__(self, records: dict[str, str]) -> None:
        self.records = records
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        reply = dns.message.make_response(query)
        q = query.question[0]
        name = q.name.to_text().rstrip(".")
        if name not in self.records:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        elif q.rdtype == dns.rdatatype.A:
            reply.answer.append(dns.rrset.from_text(q.name, 5, "IN", "A", self.records[name]))
        assert self.transport is not None
        self.transport.sendto(reply.to_wire(), addr)


class Rig:
    """Runs origins and the proxy on a private event loop in a background thread."""

    def __init__(self, tmp: Path, loop_kind: str = "asyncio") -> None:
        self.tmp = tmp
        self.origin_ca = OriginCA(tmp)
        self.loop_kind = loop_kind
        self.loop = asyncio.new_event_loop()
        if loop_kind == "uvloop":
            import uvloop

            self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.audit = MemorySink()
        self.target = Target("origin.test", "198.18.0.10", 0)
        self.serve_task: asyncio.Task[None] | None = None
        self.call(self._start())

    def call(self, coro: Awaitable[Any]) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return fut.result(timeout=30)

    async def _start(self) -> None:
        self.https = Origin(
            self.origin_ca.server_context(["origin.test", "other.test", "rebind.test"])
        )
        self.http = Origin(None)
        await self.https.start()
        await self.http.start()
        self.echo_server, self.echo_port = await tcp_echo_server()
        self.greeter_server, self.greeter_port = await tcp_greeter_server()
        transport, self.dns = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: TestDNS({"rebind.test": "127.0.0.1", "origin.test": "127.0.0.1"}),
            local_addr=("127.0.0.1", 0),
        )
        self.dns_port = transport.get_extra_info("sockname")[1]
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.proxy_port = self.listener.getsockname()[1]

    def configure(
        self,
        allow: list[str],
        *,
        secrets: SecretSet | None = None,
        pins: list[str] | None = None,
        private: list[str] | None = None,
        upstream_dns: bool = False,
        sniff_wait: float = 0.25,
        max_connections: int | None = None,
        hooks: Hooks | None = None,
    ) -> Proxy:
        """(Re)start the proxy with a new policy."""
        self.policy = Policy(allow, allow_private=private or (), add_hosts=pins or ())
        self.ca = CertificateAuthority.generate("test")
        self.ca_file = self.tmp / "sandbox-ca.pem"
        self.ca_file.write_bytes(self.ca.ca_pem())
        upstream = Upstream(
            self.policy,
            upstream_ca=str(self.origin_ca.ca_file),
            upstream_dns=[f"127.0.0.1:{self.dns_port}"] if upstream_dns else (),
        )
        self.audit.events.clear()
        self.proxy = Proxy(
            self.policy,
            secrets or SecretSet(),
            self.ca,
            self.audit,
            upstream,
            sandbox="test",
            sniff_wait=sniff_wait,
            hooks=hooks,
            **({} if max_connections is None else {"max_connections": max_connections}),
        )
        if self.serve_task is not None:
            self.loop.call_soon_threadsafe(self.serve_task.cancel)
            time.sleep(0.05)
        self.serve_task = self.call(self._serve())
        return self.proxy

    async def _serve(self) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(
            serve(self.listener, self.proxy, lambda s: self.target)
        )

    def aim(self, name: str | None, port: int, address: str = "198.18.0.10") -> None:
        self.target = Target(name, address, port)

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        return ctx

    @contextmanager
    def tls_socket(self, sni: str | None, alpn: list[str] | None = None) -> Iterator[ssl.SSLSocket]:
        ctx = self.client_context()
        if sni is None:
            ctx.check_hostname = False
        if alpn:
            ctx.set_alpn_protocols(alpn)
        raw = socket.create_connection(("127.0.0.1", self.proxy_port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            yield tls

    def get_sse_http1(self) -> list[tuple[float, bytes]]:
        """GET the origin's /sse over HTTPS/1.1 through the proxy; every chunk as received,
        with its arrival time, up to the end of the chunked body."""
        with self.tls_socket("origin.test") as s:
            s.sendall(f"GET /sse HTTP/1.1\r\nHost: origin.test:{self.https.port}\r\n\r\n"
                      .encode())
            got: list[tuple[float, bytes]] = []
            data = b""
            while b"0\r\n\r\n" not in data:
                chunk = s.recv(65536)
                assert chunk
                data += chunk
                got.append((time.monotonic(), chunk))
        return got

    def close(self) -> None:
        async def stop() -> None:
            if self.serve_task is not None:
                self.serve_task.cancel()
            self.https.server.close()
            self.http.server.close()
            self.echo_server.close()
            self.greeter_server.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.listener.close()
