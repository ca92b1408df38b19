"""Loopback servers for the pull tests: Debian's docker-registry, a bearer-token service,
and a fault-injecting HTTP proxy in front of a registry."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from tests.integration.registry.pki import TlsFiles, TokenSigner

REGISTRY_BIN = "/usr/bin/docker-registry"
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None,
                  timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {LOOPBACK}:{port}")


class RegistryServer:
    """docker-registry on 127.0.0.1 with filesystem storage below `root`."""

    def __init__(self, root: Path, *, tls: TlsFiles | None = None, htpasswd: Path | None = None,
                 token: tuple[str, TokenSigner] | None = None) -> None:
        self.root = root
        self.port = free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        self.storage = root / "storage"
        self.storage.mkdir(parents=True)
        lines = [
            "version: 0.1",
            "log:",
            "  level: error",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: {self.address}",
            "  secret: matchlock-test-secret",
        ]
        if tls is not None:
            lines += ["  tls:", f"    certificate: {tls.cert}", f"    key: {tls.key}"]
        if htpasswd is not None:
            lines += ["auth:", "  htpasswd:", "    realm: matchlock-test",
                      f"    path: {htpasswd}"]
        if token is not None:
            realm, signer = token
            lines += ["auth:", "  token:", f"    realm: {realm}",
                      f"    service: {signer.service}", f"    issuer: {signer.issuer}",
                      f"    rootcertbundle: {signer.cert_path}"]
        self.config = root / "config.yml"
        self.config.write_text("\n".join(lines) + "\n")
        self.log = root / "registry.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.proc)

    def blob_file(self, digest: str) -> Path:
        hex_part = digest.split(":", 1)[1]
        return (self.storage / "docker/registry/v2/blobs/sha256" / hex_part[:2] / hex_part
                / "data")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def htpasswd_file(path: Path, users: dict[str, str]) -> Path:
    lines = []
    for user, password in users.items():
        out = subprocess.run(["htpasswd", "-Bbn", user, password], check=True,
                             capture_output=True, text=True).stdout.strip()
        lines.append(out)
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class TokenPolicy:
    """Who may do what: users with passwords, refresh tokens, and anonymously readable repos."""

    users: dict[str, str] = field(default_factory=dict)
    refresh_tokens: dict[str, str] = field(default_factory=dict)  # token -> user
    public_prefix: str = "public/"


class TokenServer:
    """A Docker-style token endpoint: GET with basic auth, or POST an OAuth2 refresh token."""

    def __init__(self, signer: TokenSigner, policy: TokenPolicy) -> None:
        self.signer = signer
        self.policy = policy
        self.requests: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                user = server._basic_user(self.headers.get("Authorization"))
                server.requests.append({"method": "GET", "user": str(user),
                                        "scope": " ".join(query.get("scope", []))})
                if user is False:
                    self._send(401, {"details": "bad credentials"})
                    return
                self._grant(user if isinstance(user, str) and user else None,
                            query.get("scope", []), "token")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                refresh = (form.get("refresh_token") or [""])[0]
                user = server.policy.refresh_tokens.get(refresh)
                server.requests.append({"method": "POST", "user": str(user),
                                        "scope": " ".join(form.get("scope", []))})
                if (form.get("grant_type") or [""])[0] != "refresh_token" or user is None:
                    self._send(401, {"error": "invalid_grant"})
                    return
                self._grant(user, " ".join(form.get("scope", [])).split(), "access_token")

            def _grant(self, user: str | None, scopes: list[str], key: str) -> None:
                access = [server._access(user, scope) for scope in scopes]
                token = server.signer.token(user or "", [a for a in access if a])
                self._send(200, {key: token, "expires_in": 300})

            def _send(self, status: int, body: dict[str, object]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.port = self.httpd.server_address[1]
        self.realm = f"http://{LOOPBACK}:{self.port}/token"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def _basic_user(self, header: str | None) -> str | bool:
        """'' for anonymous, the user name if the password is right, False otherwise."""
        if not header:
            return ""
        try:
            scheme, value = header.split(" ", 1)
            user, _, password = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return False
        ok = scheme.lower() == "basic" and self.policy.users.get(user) == password
        return user if ok else False

    def _access(self, user: str | None, scope: str) -> dict[str, object] | None:
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if kind != "repository" or not name:
            return None
        wanted = actions.split(",")
        if user is not None and user in self.policy.users:
            granted = wanted
        elif name.startswith(self.policy.public_prefix):
            granted = [a for a in wanted if a == "pull"]
        else:
            granted = []
        return {"type": "repository", "name": name, "actions": granted}

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class ProxyLog:
    path: str
    range: str | None
    status: int


class FaultProxy:
    """Forwards GETs to a plain-HTTP registry, optionally breaking blob downloads.

    `fault(path) -> action` decides per blob request: None (pass through), "cut" (close the
    connection after half the body), "stall" (send half, set `stalled`, wait for `release`),
    or "no-range" (drop the Range header, as a server that ignores it would).
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.log: list[ProxyLog] = []
        self.fault: Callable[[str], str | None] = lambda path: None
        self.stalled = threading.Event()
        self.release = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy._forward(self)

        self.httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.address = f"{LOOPBACK}:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        action = self.fault(handler.path) if "/blobs/" in handler.path else None
        headers = {k: v for k, v in handler.headers.items()
                   if k.lower() not in ("host", "connection")}
        if action == "no-range":
            headers = {k: v for k, v in headers.items() if k.lower() != "range"}
        upstream = http.client.HTTPConnection(LOOPBACK, self.upstream_port, timeout=30)
        try:
            upstream.request("GET", handler.path, headers=headers)
            response = upstream.getresponse()
            body = response.read()
        finally:
            upstream.close()
        self.log.append(ProxyLog(handler.path, handler.headers.get("Range"), response.status))
        handler.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("connection", "transfer-encoding", "content-length"):
                handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if action in ("cut", "stall") and len(body) > 1:
            handler.wfile.write(body[: len(body) // 2])
            handler.wfile.flush()
            if action == "stall":
                self.stalled.set()
                self.release.wait(60)
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        handler.wfile.write(body)

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
