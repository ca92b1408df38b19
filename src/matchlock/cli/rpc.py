"""`matchlock rpc`: serve JSON-RPC 2.0 on stdin/stdout for the SDKs (docs/rpc.md)."""

from __future__ import annotations

import os
import sys

import click


@click.command()
def rpc() -> None:
    """Serve one sandbox over newline-delimited JSON-RPC 2.0 on stdin/stdout."""
    from matchlock.rpc.server import Server

    # Only the protocol may reach stdout: anything else printed (progress, a library's
    # warning) goes to stderr, and the protocol writes to a private copy of the descriptor.
    out = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    sys.exit(Server(0, out).serve())
