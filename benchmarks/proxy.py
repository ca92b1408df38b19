#!/usr/bin/env python3
"""Egress proxy benchmark: direct vs matchlock's proxy vs mitmproxy, side by side, one run.

    proxy.py [--mitmdump PATH] [--duration S] [--size-mb N] [--sse-samples N]
             [--loop uvloop|asyncio] [--only NAME[,NAME…]] [--json FILE]

Topology (all on loopback, inside a private mount namespace whose /etc/hosts names them):

    client ──► direct.test 127.0.0.2:8443  nginx (TLS, test CA)
    client ──► ours.test   127.0.0.3:8443  matchlock Proxy.serve ──► nginx (pinned 127.0.0.2)
    client ──► mitm.test   127.0.0.4:8443  mitmdump reverse mode   ──► nginx
    (port 8444 on each: an SSE origin in Python instead of nginx)

Our proxy gets a fixed Target (name, port) as the sandbox's plumbing would hand it; it checks
the SNI, terminates TLS with a leaf from a fresh sandbox CA, verifies nginx against the test CA,
writes one JSON audit line per request, exactly as in a sandbox. mitmdump runs in reverse mode
(the same MITM shape: it terminates TLS, verifies the origin against the test CA, and streams
bodies with stream_large_bodies=1 so that SSE and the large download are not buffered).

Measured: HTTPS requests/s on one keep-alive connection and with a new TLS connection per
request (wrk, 1 thread, 1 connection), one large download's throughput (curl) with the proxy
process's peak RSS (VmHWM, reset before the download) and CPU time, and SSE time to the first
event byte (median of N, each on a new TLS connection and on a warm keep-alive connection).
The three set-ups are measured in turn, --rounds times; the table shows medians over rounds.
The machine has 2 cores for client, proxy and origin together, so load from anything else
on it shows up directly: the load average is printed before each round.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matchlock.net.target import Target

NAMES = {"direct": "127.0.0.2", "ours": "127.0.0.3", "mitm": "127.0.0.4"}
PORT, SSE_PORT = 8443, 8444
HOSTS = "".join(f"{ip} {name}.test\n" for name, ip in NAMES.items()) + "127.0.0.2 origin.test\n"


# -- helpers run as subprocesses --------------------------------------------------------------


def serve_proxy(args: argparse.Namespace) -> None:
    """Our proxy as the sandbox would run it: one process, one event loop."""
    from matchlock.net.audit import JsonLinesSink
    from matchlock.net.certs import CertificateAuthority
    from matchlock.net.policy import Policy
    from matchlock.net.proxy import Proxy, serve
    from matchlock.net.secrets import SecretSet
    from matchlock.net.target import Target
    from matchlock.net.upstream import Upstream

    policy = Policy(
        [f"ours.test:{PORT}", f"ours.test:{SSE_PORT}"], add_hosts=[f"ours.test:{NAMES['direct']}"]
    )
    ca = CertificateAuthority.generate("bench")
    Path(args.ca_out).write_bytes(ca.ca_pem())
    audit = open(args.audit, "a", buffering=1 << 16)  # noqa: SIM115 (lives as long as the process)
    proxy = Proxy(
        policy, SecretSet(), ca, JsonLinesSink(audit), Upstream(policy, upstream_ca=args.origin_ca)
    )

    async def main() -> None:
        tasks = []
        for port in (PORT, SSE_PORT):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((NAMES["ours"], port))
            sock.listen(1024)
            target = Target("ours.test", "198.18.0.7", port)
            tasks.append(asyncio.ensure_future(serve(sock, proxy, _fixed(target))))
        Path(args.ready).touch()
        await asyncio.gather(*tasks)

    if args.loop == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def _fixed(target: Target) -> Callable[[socket.socket], Target]:
    return lambda _sock: target


def serve_sse(args: argparse.Namespace) -> None:
    """SSE origin: event 0 at once, then one every 50 ms, chunked, keep-alive."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)

    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    return
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
                )
                for i in range(3):
                    data = b"data: %d\n\n" % i
                    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                    await writer.drain()
                    await asyncio.sleep(0.05)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(conn, NAMES["direct"], SSE_PORT, ssl=ctx)
        Path(args.ready).touch()
        await server.serve_forever()

    asyncio.run(main())


def cert_costs() -> None:
    """Why the sandbox CA uses EC P-256: key generation, leaf signing, server handshake."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    from matchlock.net.certs import CertificateAuthority

    def timed(fn: Callable[[], object], n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n * 1000

    ca = CertificateAuthority.generate("bench")
    names = iter(range(10**9))
    rsa_key = rsa.generate_private_key(65537, 2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    data = b"x" * 64
    rows: list[tuple[str, Callable[[], object], int]] = [
        ("EC P-256 key generation", lambda: ec.generate_private_key(ec.SECP256R1()), 200),
        ("RSA-2048 key generation", lambda: rsa.generate_private_key(65537, 2048), 10),
        ("sandbox CA generation (EC)", lambda: CertificateAuthority.generate("x"), 50),
        ("leaf certificate (EC, signed)", lambda: ca.leaf_pem(f"n{next(names)}.test"), 200),
        ("leaf + server SSLContext", lambda: ca.context_for(f"c{next(names)}.test"), 200),
        (
            "RSA-2048 signature (per handshake)",
            lambda: rsa_key.sign(data, padding.PKCS1v15(), hashes.SHA256()),
            200,
        ),
        (
            "EC P-256 signature (per handshake)",
            lambda: ec_key.sign(data, ec.ECDSA(hashes.SHA256())),
            200,
        ),
    ]
    for label, fn, n in rows:
        print(f"{label:38} {timed(fn, n):8.3f} ms")


# -- setup ------------------------------------------------------------------------------------


def make_origin_pki(work: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench origin CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(f"{n}.test") for n in (*NAMES, "origin")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "origin.test")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName(sans), False)
        .sign(ca_key, hashes.SHA256())
    )
    (work / "origin-ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (work / "origin.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (work / "origin.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    output_buffers 2 1m;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {work}/nginx-tmp;
    proxy_temp_path {work}/nginx-tmp;
    fastcgi_temp_path {work}/nginx-tmp;
    uwsgi_temp_path {work}/nginx-tmp;
    scgi_temp_path {work}/nginx-tmp;
    server {{
        listen {ip}:{port} ssl;
        ssl_certificate {work}/origin.crt;
        ssl_certificate_key {work}/origin.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        root {work}/www;
        location = / {{ default_type text/plain; return 200 "hello from nginx\\n"; }}
    }}
}}
"""


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        argv: list[str],
        ready: Path | None = None,
        log: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.procs.append(proc)
        if ready is not None:
            deadline = time.monotonic() + 30
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{argv[0]} failed to start (see {log})")
                time.sleep(0.05)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_port(ip: str, port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((ip, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listening on {ip}:{port}")


# -- measurements -------------------------------------------------------------------------------


def wrk(url: str, duration: int, close: bool) -> float:
    argv = ["wrk", "-t1", "-c1", f"-d{duration}s", url]
    if close:
        argv[1:1] = ["-H", "Connection: close"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if m is None:
        raise SystemExit(f"wrk output not understood:\n{out}")
    if errors:
        print(f"  wrk reported errors for {url}: {errors.group(0)}", file=sys.stderr)
    return float(m.group(1))


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_hwm(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def download(url: str, ca: Path, expect: int) -> float:
    out = subprocess.run(
        [
            "curl",
            "-fsS",
            "--http1.1",
            "--cacert",
            str(ca),
            "-o",
            "/dev/null",
            "-w",
            "%{speed_download} %{size_download}",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    speed, size = out.split()
    if int(size) != expect:
        raise SystemExit(f"download of {url} returned {size} bytes, expected {expect}")
    return float(speed) / 1e6


def sse_first_byte(host: str, ca: Path, samples: int) -> tuple[float, float]:
    """Median ms to the first event byte: (new TLS connection each, warm keep-alive)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    request = f"GET /events HTTP/1.1\r\nHost: {host}:{SSE_PORT}\r\n\r\n".encode()

    def until_end(s: ssl.SSLSocket) -> None:
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise SystemExit("SSE stream ended early")
            data += chunk

    def first_event(s: ssl.SSLSocket) -> None:
        data = b""
        while b"data: 0" not in data:
            data += s.recv(65536)

    cold, warm = [], []
    for _ in range(samples):
        t0 = time.perf_counter()
        raw = socket.create_connection((host, SSE_PORT))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            s.sendall(request)
            first_event(s)
            cold.append(time.perf_counter() - t0)
            until_end(s)
            t0 = time.perf_counter()
            s.sendall(request)
            first_event(s)
            warm.append(time.perf_counter() - t0)
            until_end(s)
    return statistics.median(cold) * 1000, statistics.median(warm) * 1000


def measure(
    who: str,
    out: dict[str, list[float]],
    ca: Path,
    pid: int | None,
    only: set[str] | None,
    args: argparse.Namespace,
) -> None:
    url = f"https://{who}.test:{PORT}/"
    subprocess.run(["curl", "-fsS", "--cacert", str(ca), "-o", "/dev/null", url], check=True)

    def record(key: str, value: float) -> float:
        out.setdefault(key, []).append(value)
        return value

    if only is None or "keepalive" in only:
        rps = record("keepalive_rps", wrk(url, args.duration, close=False))
        print(f"  {who:6} keep-alive  {rps:9.0f} req/s", flush=True)
    if only is None or "newconn" in only:
        rps = record("newconn_rps", wrk(url, args.duration, close=True))
        print(f"  {who:6} new conn    {rps:9.0f} req/s", flush=True)
    if only is None or "download" in only:
        if pid is not None:
            cpu0 = cpu_seconds(pid)
            reset_hwm(pid)
        mbps = record(
            "download_mbps",
            download(f"https://{who}.test:{PORT}/big.bin", ca, args.size_mb * 1024 * 1024),
        )
        rss = ""
        if pid is not None:
            peak = record("peak_rss_mib", vm_hwm_kib(pid) / 1024)
            cpu = record("download_cpu_s", cpu_seconds(pid) - cpu0)
            rss = f"  peak RSS {peak:.0f} MiB, {cpu:.2f} CPU-s"
        print(f"  {who:6} download    {mbps:9.0f} MB/s{rss}", flush=True)
    if only is None or "sse" in only:
        cold, warm = sse_first_byte(f"{who}.test", ca, args.sse_samples)
        record("sse_first_byte_new_ms", cold)
        record("sse_first_byte_warm_ms", warm)
        print(f"  {who:6} SSE first byte {cold:6.2f} ms new conn, {warm:6.2f} ms warm", flush=True)


# -- orchestration ----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    work = Path(tempfile.mkdtemp(prefix="mlbench-"))
    work.chmod(0o755)  # nginx's workers run unprivileged and serve from here
    (work / "www").mkdir()
    (work / "nginx-tmp").mkdir()
    make_origin_pki(work)
    big = work / "www" / "big.bin"
    with open(big, "wb") as f:
        f.truncate(args.size_mb * 1024 * 1024)  # sparse, and read once so that every
    with open(big, "rb") as f:  # download is served from the page cache
        while f.read(1 << 20):
            pass
    hosts = work / "hosts"
    hosts.write_text(HOSTS)
    subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)
    (work / "nginx.conf").write_text(NGINX_CONF.format(work=work, ip=NAMES["direct"], port=PORT))
    procs = Procs()
    me = [sys.executable, os.path.abspath(__file__)]
    results: dict[str, dict[str, float]] = {k: {} for k in NAMES}
    print(f"load average before: {os.getloadavg()}")
    try:
        procs.start(["nginx", "-c", str(work / "nginx.conf")], log=work / "nginx.log")
        procs.start(
            [
                *me,
                "serve-sse",
                "--cert",
                str(work / "origin.crt"),
                "--key",
                str(work / "origin.key"),
                "--ready",
                str(work / "sse.ready"),
            ],
            ready=work / "sse.ready",
            log=work / "sse.log",
        )
        ours = procs.start(
            [
                *me,
                "serve-proxy",
                "--origin-ca",
                str(work / "origin-ca.pem"),
                "--ca-out",
                str(work / "sandbox-ca.pem"),
                "--audit",
                str(work / "audit.jsonl"),
                "--ready",
                str(work / "proxy.ready"),
                "--loop",
                args.loop,
            ],
            ready=work / "proxy.ready",
            log=work / "proxy.log",
        )
        mitm_conf = work / "mitm"
        mitm = procs.start(
            [
                args.mitmdump,
                "-q",
                "--set",
                f"confdir={mitm_conf}",
                "--set",
                f"ssl_verify_upstream_trusted_ca={work / 'origin-ca.pem'}",
                "--set",
                "stream_large_bodies=1",
                "--set",
                "connection_strategy=lazy",
                "--mode",
                f"reverse:https://origin.test:{PORT}@{NAMES['mitm']}:{PORT}",
                "--mode",
                f"reverse:https://origin.test:{SSE_PORT}@{NAMES['mitm']}:{SSE_PORT}",
            ],
            log=work / "mitm.log",
        )
        wait_port(NAMES["direct"], PORT)
        wait_port(NAMES["mitm"], PORT)
        wait_port(NAMES["mitm"], SSE_PORT)
        cas = {
            "direct": work / "origin-ca.pem",
            "ours": work / "sandbox-ca.pem",
            "mitm": mitm_conf / "mitmproxy-ca-cert.pem",
        }
        pids = {"ours": ours.pid, "mitm": mitm.pid}
        only = set(args.only.split(",")) if args.only else None
        targets = [w for w in NAMES if not args.targets or w in args.targets.split(",")]
        samples: dict[str, dict[str, list[float]]] = {w: {} for w in NAMES}
        spy = None
        if args.py_spy and "ours" in targets:  # a profile of our proxy over all its runs
            out = Path(args.json or "bench").with_suffix(".spy")
            spy = subprocess.Popen(
                [
                    args.py_spy,
                    "record",
                    "--native",
                    "-r",
                    "500",
                    "-f",
                    "raw",
                    "-o",
                    str(out),
                    "--pid",
                    str(pids["ours"]),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1)
        for rnd in range(args.rounds):
            # Rounds interleave the three set-ups, so that load from elsewhere on the machine
            # hits them alike; the table shows medians over rounds.
            print(f"round {rnd + 1}/{args.rounds}, load average {os.getloadavg()[0]:.2f}")
            for who in targets:
                measure(who, samples[who], cas[who], pids.get(who), only, args)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait()
        for who, keys in samples.items():
            for key, values in keys.items():
                results[who][key] = statistics.median(values)
                results[who][key + "_all"] = values  # type: ignore[assignment]
    finally:
        procs.stop()
        subprocess.run(["umount", "/etc/hosts"], check=False)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return results


def table(results: dict[str, dict[str, float]], size_mb: int) -> str:
    d, o, m = results["direct"], results["ours"], results["mitm"]

    def cell(r: dict[str, float], key: str, fmt: str) -> str:
        return format(r[key], fmt) if key in r else "-"

    def ratio(key: str, invert: bool = False) -> str:
        if key not in o or key not in m or not o[key] or not m[key]:
            return "-"
        return f"{(m[key] / o[key]) if invert else (o[key] / m[key]):.1f}x"

    rows = [
        ("HTTPS req/s, one keep-alive connection", "keepalive_rps", ",.0f", False),
        ("HTTPS req/s, new TLS connection per request", "newconn_rps", ",.0f", False),
        (f"one {size_mb} MiB download, MB/s", "download_mbps", ",.0f", False),
        ("proxy peak RSS during the download, MiB", "peak_rss_mib", ",.0f", True),
        ("proxy CPU seconds for the download", "download_cpu_s", ",.2f", True),
    ]
    lines = [
        "| | direct | matchlock proxy | mitmdump 11.0.2 | proxy vs mitmdump |",
        "|---|---|---|---|---|",
    ]
    for label, key, fmt, inv in rows:
        lines.append(
            f"| {label} | {cell(d, key, fmt)} | {cell(o, key, fmt)} | "
            f"{cell(m, key, fmt)} | {ratio(key, inv)} |"
        )
    for label, key in (
        ("SSE first byte, new connection, ms (median)", "sse_first_byte_new_ms"),
        ("SSE first byte, warm connection, ms (median)", "sse_first_byte_warm_ms"),
    ):
        added = ""
        if key in d:
            added = " / ".join(f"+{r[key] - d[key]:.2f}" for r in (o, m) if key in r)
        lines.append(
            f"| {label} | {cell(d, key, '.2f')} | {cell(o, key, '.2f')} | "
            f"{cell(m, key, '.2f')} | added: {added} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd")
    p = sub.add_parser("serve-proxy")
    p.add_argument("--origin-ca", required=True)
    p.add_argument("--ca-out", required=True)
    p.add_argument("--audit", required=True)
    p.add_argument("--ready", required=True)
    p.add_argument("--loop", default="uvloop")
    sub.add_parser("certs", help="time CA/leaf generation and handshakes: EC P-256 vs RSA-2048")
    s = sub.add_parser("serve-sse")
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--ready", required=True)
    parser.add_argument("--mitmdump", default="/tmp/mitm-venv/bin/mitmdump")
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--sse-samples", type=int, default=30)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--only", default="", help="keepalive,newconn,download,sse")
    parser.add_argument("--targets", default="", help="direct,ours,mitm (default: all)")
    parser.add_argument("--json")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--py-spy", help="profile our proxy with this py-spy (written next to --json)"
    )
    parser.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cmd == "serve-proxy":
        return serve_proxy(args)
    if args.cmd == "serve-sse":
        return serve_sse(args)
    if args.cmd == "certs":
        return cert_costs()
    for tool in ("nginx", "wrk", "curl", "unshare"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is required (apt-get install nginx-light wrk curl)")
    if not Path(args.mitmdump).exists():
        raise SystemExit(
            f"mitmdump not found at {args.mitmdump} (pip install mitmproxy into a "
            "separate venv, then --mitmdump PATH)"
        )
    if not args.in_namespace:
        # A private mount namespace, so the /etc/hosts bind mount is seen by nothing else.
        os.execvp(
            "unshare",
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                sys.executable,
                os.path.abspath(__file__),
                *sys.argv[1:],
                "--in-namespace",
            ],
        )
    results = run(args)
    print()
    print(table(results, args.size_mb))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
