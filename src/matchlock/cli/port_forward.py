"""`matchlock port-forward [--address A]... ID [LOCAL:]REMOTE...`: listen on the host and
relay each connection to a guest port of a running detached sandbox, through its
supervisor's control socket (no guest NIC needed), until Ctrl-C."""

from __future__ import annotations

import signal
import sys
import threading

import click

from matchlock.errors import MatchlockError

_HINT = "use [LOCAL:]REMOTE with ports 1-65535, e.g. 8080 or 18080:8080"


@click.command("port-forward")
@click.option("--address", "addresses", multiple=True, metavar="ADDR",
              help="Host address to listen on (repeatable; default 127.0.0.1).")
@click.argument("sandbox_id")
@click.argument("specs", nargs=-1, required=True, metavar="[LOCAL:]REMOTE...")
def port_forward(addresses: tuple[str, ...], sandbox_id: str, specs: tuple[str, ...]) -> None:
    """Forward host ports to guest ports of SANDBOX_ID until interrupted."""
    from matchlock.sandbox import wire
    from matchlock.sandbox.control import connect, request
    from matchlock.sandbox.pipe import PipeClient
    from matchlock.sandbox.ports import PortForwarder, parse_publish

    addrs = list(addresses) or ["127.0.0.1"]
    ports = parse_publish(specs, addrs, flag="port", hint=_HINT)
    # The sandbox must be there and answer before any port is taken.
    sock = connect(sandbox_id)
    try:
        answer = request(sock, {"op": "ping"})
    except (OSError, wire.WireError) as e:
        raise MatchlockError(f"sandbox {sandbox_id}'s supervisor does not answer: {e}") from None
    finally:
        sock.close()
    if answer is None or answer.type != wire.EXIT:
        raise MatchlockError(f"sandbox {sandbox_id}'s supervisor does not answer")
    fw = PortForwarder(ports, addrs, hint="choose another host port: LOCAL:REMOTE")
    stop = threading.Event()

    def on_signal(signo: int, frame: object) -> None:
        stop.set()

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    try:
        for b in fw.bindings:
            host = f"[{b.address}]" if ":" in b.address else b.address
            click.echo(f"Forwarding {host}:{b.local_port} -> sandbox:{b.remote_port}", err=True)
        fw.start_with(lambda port: PipeClient(sandbox_id, port), lambda: not stop.is_set())
        while not stop.wait(0.5):
            if not _running(sandbox_id):
                raise MatchlockError(f"sandbox {sandbox_id} stopped")
    finally:
        fw.close()
    sys.exit(0)


def _running(sid: str) -> bool:
    from matchlock.state import registry

    try:
        return registry.lookup(sid).status == "running"
    except MatchlockError:
        return False
