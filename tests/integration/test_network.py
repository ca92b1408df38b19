"""Egress control end to end: a real VM, real clients in the guest, real upstream servers.

The upstream servers run in a network namespace these tests create ("upstream", 10.99.0.2,
reached from the host through a veth pair); no packet goes anywhere else. The test names
resolve to that address only through `--add-host` pins (or, for the rebinding test, through a
DNS server in that namespace), so everything a guest reaches here was explicitly allowed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from matchlock.sandbox.network import Egress, NetworkOptions

from .conftest import MATCHLOCK
from .guest_util import Guest, booted

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]
UPSTREAM = "10.99.0.2"
SECRET_VALUE = "s3cr3t-" + secrets.token_hex(8)
NS = f"mltest-up-{os.getpid()}"
VETH = f"mlt{os.getpid() % 100000}"


def _ca(tmp: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "matchlock test upstream CA")])
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(days=1))
          .not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(key, hashes.SHA256()))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    names = ["api.test", "other.test", "rebind.test", "public.test"]
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api.test")]))
            .issuer_name(name).public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    (tmp / "server.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp / "server.key").write_bytes(leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ca_path = tmp / "ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return ca_path


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@dataclass
class Upstream:
    dir: Path
    ca: Path

    def log(self, name: str) -> str:
        path = self.dir / name
        return path.read_text() if path.exists() else ""


def _remove_stale() -> None:
    """A run killed before its teardown leaves its namespace and veth, whose 10.99.0.1 route
    would shadow this run's: remove those of runs whose process is gone."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith("mltest-up-") or name == NS:
            continue
        pid = int(name.rsplit("-", 1)[1])
        if Path(f"/proc/{pid}").exists():
            continue
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                              text=True).stdout.split()
        for orphan in pids:  # that run's upstream server, orphaned when it was killed
            subprocess.run(["kill", "-9", orphan], capture_output=True)
        subprocess.run(["ip", "link", "del", f"mlt{pid % 100000}"], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextlib.contextmanager
def namespace_server(script: str, d: Path, *args: str) -> Iterator[None]:
    """The test namespace (10.99.0.2 behind a veth from 10.99.0.1) with `script` (a file next
    to this one) serving in it, from the moment it writes `d/ready` until the block ends."""
    _remove_stale()
    _sh("ip", "netns", "add", NS)
    proc = None
    try:
        _sh("ip", "link", "add", VETH, "type", "veth", "peer", "name", "eth0", "netns", NS)
        _sh("ip", "addr", "add", "10.99.0.1/24", "dev", VETH)
        _sh("ip", "link", "set", VETH, "up")
        _sh("ip", "netns", "exec", NS, "ip", "addr", "add", f"{UPSTREAM}/24", "dev", "eth0")
        _sh("ip", "netns", "exec", NS, "ip", "link", "set", "eth0", "up")
        _sh("ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", NS, sys.executable, str(Path(__file__).with_name(script)),
             str(d), *args],
            stdout=subprocess.DEVNULL, stderr=open(d / "server.err", "w"))  # noqa: SIM115
        deadline = time.monotonic() + 20
        while not (d / "ready").exists():
            assert proc.poll() is None, (d / "server.err").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "link", "del", VETH], capture_output=True)
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    d = tmp_path_factory.mktemp("upstream")
    ca = _ca(d)
    with namespace_server("upstream_server.py", d):
        yield Upstream(d, ca)


@pytest.fixture(scope="module")
def guest(upstream: Upstream, python_image: str, state_dir: Path) -> Iterator[Guest]:
    egress = Egress(NetworkOptions(
        allow_hosts=["api.test", "other.test", "rebind.test", "api.test:7"],
        add_hosts=["api.test:10.99.0.2", "other.test:10.99.0.2"],
        secrets=[f"MY_TOKEN={SECRET_VALUE}@api.test"],
        upstream_ca=str(upstream.ca),
        upstream_dns=[f"{UPSTREAM}:53"],
    ))
    with booted(python_image, egress) as g:
        yield g


FETCH = """
import json, sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[1] if len(sys.argv) > 1 else URL, headers=HEADERS)
try:
    with urllib.request.urlopen(req, timeout=20) as r:
        print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
except Exception as e:
    print("ERR", type(e).__name__, e)
"""


def fetch(guest: Guest, url: str, headers: dict[str, str] | None = None) -> tuple[str, str]:
    code, out, err = guest.run(f"URL={url!r}; HEADERS={headers or {}!r}\n{FETCH}")
    assert code == 0, err
    status, _, body = out.partition("\n")
    return status, body


# --- what must work ------------------------------------------------------------------------


def test_allowed_host_over_http_and_https(guest: Guest) -> None:
    for url in ("http://api.test/headers", "https://api.test/headers"):
        status, body = fetch(guest, url)
        assert status == "200", body
        assert json.loads(body)["requestline"] == "GET /headers HTTP/1.1"


def test_secret_reaches_only_its_host(guest: Guest, upstream: Upstream) -> None:
    status, _body = fetch(guest, "https://api.test/headers",
                         {"Authorization": "Bearer $MY_TOKEN"})
    assert status == "200"
    placeholder = dict(kv.split("=", 1) for kv in guest.env)["MY_TOKEN"]
    assert placeholder.startswith("SANDBOX_SECRET_") and SECRET_VALUE not in placeholder
    # The guest sent the placeholder (the shell-less urllib sends it literally)…
    code, out, _ = guest.run(
        "import os, json, urllib.request as u\n"
        "r = u.urlopen(u.Request('https://api.test/headers', headers={'Authorization': "
        "'Bearer ' + os.environ['MY_TOKEN']}), timeout=20)\n"
        "print(json.dumps(dict(json.load(r)['headers'])))")
    assert code == 0
    # …upstream received the real value (its log), and the echo came back masked.
    assert json.loads(out)["Authorization"] == "Bearer " + "*" * len(SECRET_VALUE)
    assert f"Authorization: Bearer {SECRET_VALUE}" in upstream.log("heads.log")


def test_an_echoing_origin_cannot_hand_the_value_back(guest: Guest) -> None:
    # The upstream echoes the request head: with the value injected, the echo would carry it.
    code, out, err = guest.run(
        "import os, urllib.request as u\n"
        "r = u.urlopen(u.Request('https://api.test/headers', headers={'Authorization': "
        "'Bearer ' + os.environ['MY_TOKEN'], 'Accept-Encoding': 'gzip'}), timeout=20)\n"
        "print(r.headers.get('Content-Encoding')); print(r.read().decode())")
    assert code == 0, err
    encoding, body = out.split("\n", 1)
    assert encoding == "None"  # the proxy asked the origin for plain bytes
    auth = dict(json.loads(body)["headers"])["Authorization"]
    assert auth == "Bearer " + "*" * len(SECRET_VALUE)
    assert SECRET_VALUE not in out


def test_placeholder_to_another_allowed_host_is_403(guest: Guest) -> None:
    code, out, _ = guest.run(
        "import os, urllib.request as u, urllib.error as e\n"
        "try:\n"
        "    u.urlopen(u.Request('https://other.test/headers', headers={'X-Key': "
        "os.environ['MY_TOKEN']}), timeout=20)\n"
        "except e.HTTPError as x:\n"
        "    print(x.code, x.read().decode())\n")
    assert code == 0
    assert out.startswith("403 ")
    assert "MY_TOKEN" in out and SECRET_VALUE not in out
    log = (guest.sandbox.dir / "network.log").read_text()  # type: ignore[operator]
    blocked = [json.loads(ln) for ln in log.splitlines() if '"block"' in ln]
    assert any(ev["host"] == "other.test" and "MY_TOKEN" in ev["reason"] for ev in blocked)
    assert SECRET_VALUE not in log


def test_guest_sees_only_the_placeholder(guest: Guest) -> None:
    code, out, _ = guest.sh(
        "cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n' | grep MY_TOKEN; "
        f"grep -rl {SECRET_VALUE} / --exclude-dir=proc --exclude-dir=sys 2>/dev/null; true")
    assert code == 0
    assert SECRET_VALUE not in out
    assert "MY_TOKEN=SANDBOX_SECRET_" in out


def test_sse_chunks_arrive_as_sent(guest: Guest) -> None:
    code, out, err = guest.run(
        "import time, http.client, ssl\n"
        "c = http.client.HTTPSConnection('api.test', timeout=20)\n"
        "c.request('GET', '/sse'); r = c.getresponse(); t0 = time.time(); n = 0\n"
        "while n < 5:\n"
        "    line = r.fp.readline()\n"
        "    if line.startswith(b'data:'):\n"
        "        n += 1; print(round(time.time() - t0, 2))\n")
    assert code == 0, err
    arrivals = [float(x) for x in out.split()]
    assert len(arrivals) == 5
    # Sent 0.4 s apart: a buffering proxy would deliver them all at the end.
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(g > 0.2 for g in gaps), arrivals


def test_raw_tcp_to_an_allowed_port(guest: Guest) -> None:
    code, out, err = guest.run(
        "import socket; s = socket.create_connection(('api.test', 7), timeout=10)\n"
        "s.sendall(b'ping over tcp'); print(s.recv(100).decode())")
    assert (code, out.strip()) == (0, "ping over tcp"), err


# --- what must be blocked ----------------------------------------------------------------------

CONNECT = """
import socket, sys
try:
    s = socket.create_connection((HOST, PORT), timeout=10)
    s.sendall(b"GET / HTTP/1.1\\r\\nHost: " + HOST.encode() + b"\\r\\n\\r\\n")
    data = s.recv(200)
    print("DATA" if data else "CLOSED", data[:40])
except OSError as e:
    print("ERR", type(e).__name__)
"""


def connect(guest: Guest, host: str, port: int) -> str:
    code, out, err = guest.run(f"HOST={host!r}; PORT={port}\n{CONNECT}")
    assert code == 0, err
    return out.strip()


def refused(result: str) -> bool:
    """Blocked: the connection failed, was closed, or got the proxy's 403 (an HTTP request
    is answered with an explanation rather than a reset)."""
    return result.split()[0] in ("ERR", "CLOSED") or result.startswith("DATA b'HTTP/1.1 403")


def test_not_allowed_host_has_no_name(guest: Guest) -> None:
    _code, out, _ = guest.run(
        "import socket\ntry:\n    socket.getaddrinfo('blocked.test', 80)\n"
        "except socket.gaierror as e:\n    print('gaierror')")
    assert out.strip() == "gaierror"


def test_direct_ip_connect_is_refused(guest: Guest, upstream: Upstream) -> None:
    before = upstream.log("http.log")
    for port in (80, 443):
        assert refused(connect(guest, UPSTREAM, port))
    status, _ = fetch(guest, f"http://{UPSTREAM}/ip-literal")
    assert status.startswith(("ERR", "403"))
    assert upstream.log("http.log") == before


def test_sni_host_mismatch_is_blocked(guest: Guest, upstream: Upstream) -> None:
    before = upstream.log("http.log")
    code, out, _ = guest.run(
        "import ssl, socket\n"
        "ctx = ssl.create_default_context()\n"
        "s = ctx.wrap_socket(socket.create_connection(('api.test', 443), timeout=10), "
        "server_hostname='api.test')\n"
        "s.sendall(b'GET /fronted HTTP/1.1\\r\\nHost: other.test\\r\\n\\r\\n')\n"
        "print(s.recv(100).split(b'\\r\\n')[0].decode())")
    assert code == 0
    assert out.startswith("HTTP/1.1 403")
    assert "/fronted" not in upstream.log("http.log").replace(before, "")


def test_tls_to_a_name_the_connection_was_not_opened_for_gets_an_alert(guest: Guest) -> None:
    _code, out, _ = guest.run(
        "import ssl, socket\n"
        "ctx = ssl.create_default_context()\n"
        "try:\n"
        "    ctx.wrap_socket(socket.create_connection(('api.test', 443), timeout=10), "
        "server_hostname='blocked.test')\n"
        "    print('HANDSHAKE OK')\n"
        "except (ssl.SSLError, OSError) as e:\n"
        "    print('REFUSED', type(e).__name__)\n")
    assert out.startswith("REFUSED")


def test_dns_to_an_outside_resolver_is_dropped(guest: Guest, upstream: Upstream) -> None:
    _code, out, _ = guest.sh(f"nslookup -timeout=2 api.test {UPSTREAM}; echo rc=$?")
    assert "rc=0" not in out
    assert upstream.log("dns.log") == ""


def test_dns_tunnelling_is_refused(guest: Guest) -> None:
    code, out, err = guest.run(
        "import socket, struct, os\n"
        "def q(name, qtype):\n"
        "    wire = b''.join(bytes([len(p)]) + p.encode() for p in name.split('.')) + b'\\0'\n"
        "    pkt = struct.pack('>HHHHHH', 7, 0x100, 1, 0, 0, 0) + wire + struct.pack('>HH', "
        "qtype, 1)\n"
        "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)\n"
        "    s.sendto(pkt, ('10.213.0.1', 53)); r = s.recv(4096)\n"
        "    return r[3] & 0xF, struct.unpack('>H', r[6:8])[0]\n"
        "print(q('exfil' + os.urandom(20).hex() + '.blocked.test', 1))\n"
        "print(q('api.test', 16))\n")
    assert code == 0, err
    nx, txt = out.splitlines()
    assert nx == "(3, 0)"  # NXDOMAIN, no answer
    assert txt.endswith(", 0)")  # TXT: no records, whatever the rcode


def test_udp_is_dropped(guest: Guest, upstream: Upstream) -> None:
    guest.run("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
              f"[s.sendto(b'leak', ('{UPSTREAM}', 9999)) for _ in range(3)]")
    time.sleep(0.5)
    assert upstream.log("udp.log") == ""


def test_icmp_is_dropped(guest: Guest) -> None:
    _code, out, _ = guest.sh(f"ping -c 1 -W 2 {UPSTREAM}; echo rc=$?")
    assert "rc=0" not in out and "1 packets received" not in out


def test_ipv6_is_absent(guest: Guest) -> None:
    _code, out, _ = guest.run(
        "import socket\ntry:\n    socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\n"
        "    print('HAVE IPV6')\nexcept OSError as e:\n    print('NO IPV6', e.errno)")
    assert out.startswith("NO IPV6")


def test_metadata_address_is_refused(guest: Guest) -> None:
    assert refused(connect(guest, "169.254.169.254", 80))


def test_private_address_via_a_name_is_blocked(guest: Guest, upstream: Upstream) -> None:
    # rebind.test is allowed, but the host resolves it (through the upstream DNS) to a
    # private address and it is not pinned: blocked on the address actually dialled.
    before = upstream.log("http.log")
    status, body = fetch(guest, "http://rebind.test/rebind")
    assert status == "403", body
    assert "rebind" not in upstream.log("http.log").replace(before, "")


def test_etc_hosts_spoofing_does_not_help(guest: Guest, upstream: Upstream) -> None:
    before = upstream.log("http.log")
    # Both a made-up name and an allowed one, pointed at an address of the guest's choosing.
    guest.sh(f"cp /etc/hosts /tmp/hosts.bak; echo '{UPSTREAM} evil.test' >> /etc/hosts; "
             f"sed -i '1i {UPSTREAM} api.test' /etc/hosts")
    try:
        for host in ("evil.test", "api.test"):
            assert refused(connect(guest, host, 80))
    finally:
        guest.sh("cp /tmp/hosts.bak /etc/hosts")
    assert upstream.log("http.log") == before


def test_connect_tunnel_to_a_not_allowed_host_is_blocked(guest: Guest) -> None:
    _code, out, _ = guest.run(
        "import socket; s = socket.create_connection(('api.test', 80), timeout=10)\n"
        "s.sendall(b'CONNECT blocked.test:443 HTTP/1.1\\r\\nHost: blocked.test:443\\r\\n\\r\\n')\n"
        "print(s.recv(100).split(b'\\r\\n')[0].decode())")
    assert out.startswith("HTTP/1.1 403")


def test_port_not_allowed_is_blocked(guest: Guest, upstream: Upstream) -> None:
    before = upstream.log("http.log")
    assert refused(connect(guest, "api.test", 8080))
    assert upstream.log("http.log") == before


# --- the CLI -----------------------------------------------------------------------------


def test_cli_flags_end_to_end(upstream: Upstream, python_image: str, state_dir: Path) -> None:
    env = {**os.environ, "CLI_TOKEN": "cli-" + SECRET_VALUE}
    script = ("import os, json, urllib.request as u\n"
              "r = u.urlopen(u.Request('https://api.test/headers', headers={'X-T': "
              "os.environ['CLI_TOKEN']}), timeout=20)\n"
              "print(os.environ['CLI_TOKEN'][:15], dict(json.load(r)['headers'])['X-T'])")
    r = subprocess.run(
        [MATCHLOCK, "run", "--image", python_image, "--allow-host", "api.test",
         "--add-host", "api.test:10.99.0.2", "--secret", "CLI_TOKEN@api.test,other.test",
         "--upstream-ca", str(upstream.ca), "--log-network", "--", "python3", "-c", script],
        capture_output=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr
    placeholder, received = r.stdout.decode().split()
    assert placeholder == "SANDBOX_SECRET_" and received == "*" * len("cli-" + SECRET_VALUE)
    assert f"X-T: cli-{SECRET_VALUE}" in upstream.log("heads.log")
    assert b"allow api.test:443 GET /headers 200" in r.stderr
    assert SECRET_VALUE.encode() not in r.stderr


def test_cli_default_is_sealed(state_dir: Path) -> None:
    r = subprocess.run([MATCHLOCK, "run", "--", "sh", "-c",
                        "nslookup api.test >/dev/null 2>&1; echo dns=$?; "
                        f"echo x | nc -w 2 {UPSTREAM} 80; echo done"],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert b"dns=1" in r.stdout


def test_busybox_wget_through_the_cli(upstream: Upstream, state_dir: Path) -> None:
    # HTTPS too: BusyBox's own TLS 1.2 client sends no signature_algorithms (SHA-1 only).
    r = subprocess.run(
        [MATCHLOCK, "run", "--allow-host", "api.test", "--add-host", "api.test:10.99.0.2",
         "--upstream-ca", str(upstream.ca), "--",
         "sh", "-c", "wget -q -O /tmp/r http://api.test/headers && cat /tmp/r; "
         "wget -q -O /tmp/t https://api.test/tls && cat /tmp/t; "
         "wget -q -O /tmp/s http://other.test/ ; echo other=$?"],
        capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert '"requestline": "GET /headers HTTP/1.1"' in out
    assert '"requestline": "GET /tls HTTP/1.1"' in out
    assert "other=1" in out
