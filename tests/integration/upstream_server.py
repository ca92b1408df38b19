"""Upstream servers for the egress tests; runs inside the tests' own "upstream" namespace.

    upstream_server.py DIR      (DIR holds server.pem, server.key; logs are written there)

HTTP on 80 and 8080, HTTPS on 443 (certificate for the test names, from the tests' CA), a TCP
echo on 7, a UDP sink on 9999 and a DNS server on 53 that logs every query it sees. Every
request's head is echoed back as JSON so tests can see exactly what arrived upstream.
"""

from __future__ import annotations

import json
import socket
import socketserver
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dns.message
import dns.rrset

DIR = Path(sys.argv[1])
ADDR = "10.99.0.2"
DNS_ANSWERS = {"rebind.test.": "10.99.0.2", "public.test.": "10.99.0.2"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: object) -> None:
        with open(DIR / "http.log", "a") as f:
            f.write(f"{self.requestline}\n")

    def do_GET(self) -> None:
        with open(DIR / "heads.log", "a") as f:
            f.write(self.requestline + "\n" + str(self.headers) + "\n")
        echo = self.headers.get("Authorization", "").encode("latin-1")
        if self.path.startswith("/echo-split"):  # Authorization back, one byte per chunk
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(len(echo)):
                self.wfile.write(b"1;e=%s\r\n%s\r\n" % (echo, echo[i : i + 1]))
            self.wfile.write(b"0\r\nX-Trailer: %s\r\n\r\n" % echo)
            return
        if self.path.startswith("/hints"):  # 103 Early Hints echoing Authorization
            self.send_response_only(103)
            self.send_header("Link", f"<{echo.decode('latin-1')}>")
            self.end_headers()
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
            return
        if self.path.startswith("/sse"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(5):
                chunk = f"data: {i} {time.time():.3f}\n\n".encode()
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.flush()
                time.sleep(0.4)
            self.wfile.write(b"0\r\n\r\n")
            return
        body = json.dumps({
            "requestline": self.requestline,
            "headers": [[k, v] for k, v in self.headers.items()],
            "port": self.server.server_address[1],
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET


def serve_http(port: int, tls: bool) -> None:
    server = ThreadingHTTPServer((ADDR, port), Handler)
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(DIR / "server.pem", DIR / "server.key")
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


def serve_udp_sink() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ADDR, 9999))
    while True:
        data, peer = s.recvfrom(65536)
        with open(DIR / "udp.log", "a") as f:
            f.write(f"{peer} {data!r}\n")


def serve_dns() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ADDR, 53))
    while True:
        data, peer = s.recvfrom(4096)
        try:
            q = dns.message.from_wire(data)
        except Exception:
            continue
        name = q.question[0].name.to_text()
        with open(DIR / "dns.log", "a") as f:
            f.write(f"{peer} {name}\n")
        r = dns.message.make_response(q)
        if name in DNS_ANSWERS and q.question[0].rdtype == 1:
            r.answer.append(dns.rrset.from_text(name, 5, "IN", "A", DNS_ANSWERS[name]))
        s.sendto(r.to_wire(), peer)


def main() -> None:
    threads = [
        threading.Thread(target=serve_http, args=(80, False)),
        threading.Thread(target=serve_http, args=(8080, False)),
        threading.Thread(target=serve_http, args=(443, True)),
        threading.Thread(target=serve_udp_sink),
        threading.Thread(target=serve_dns),
        threading.Thread(
            target=socketserver.ThreadingTCPServer((ADDR, 7), Echo).serve_forever),
    ]
    for t in threads:
        t.daemon = True
        t.start()
    (DIR / "ready").touch()
    threading.Event().wait()


if __name__ == "__main__":
    main()
