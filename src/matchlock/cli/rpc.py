"""`matchlock rpc`: serve JSON-RPC 2.0 on stdin/stdout for the SDKs (docs/rpc.md)."""

from __future__ import annotations

import os
import sys

import click


@click.command()
def rpc() -> None:
    """Serve one sandbox over newline-delimited JSON-RPC 2.0 on stdin/stdout."""
    from matchlock.rpc import datachan
    from matchlock.rpc.server import Server

    # This project's SDK passes two pipes for raw file content (rpc/datachan.py). Taken out
    # of the environment: no child (the VMM, an exec's host tools) sees a stale name.
    fds = None
    spec = os.environ.pop(datachan.ENV, None)
    if spec is not None:
        try:
            fds = datachan.parse_fds(spec)
        except datachan.DataChannelError as e:
            raise click.UsageError(str(e)) from None
        for fd in fds:  # ours alone: the VMM and the reaper must not hold them open
            os.set_inheritable(fd, False)

    # Only the protocol may reach stdout: anything else printed (progress, a library's
    # warning) goes to stderr, and the protocol writes to a private copy of the descriptor.
    out = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    sys.exit(Server(0, out, fds).serve())
