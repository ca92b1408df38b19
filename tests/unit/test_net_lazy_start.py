"""The network's start-up work: what it must still check at once, and what waits."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from matchlock.net.policy import Policy
from matchlock.net.upstream import Upstream


def test_a_bad_upstream_ca_still_fails_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ssl.SSLError):
        Upstream(Policy([]), upstream_ca=str(bad))


def test_without_an_upstream_ca_the_roots_are_loaded_on_first_use() -> None:
    up = Upstream(Policy([]))
    assert up._tls == {}  # the host's root bundle is not parsed for a sandbox that never dials
    ctx = up._client_context(("http/1.1",))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert up._client_context(("http/1.1",)) is ctx


def test_starting_a_sandbox_network_loads_no_dns_parser() -> None:
    """dnspython (~30 ms and ~3 MiB per owner) waits for a query or --upstream-dns."""
    import subprocess
    import sys

    code = ("import sys, matchlock.sandbox.network, matchlock.net.stack, matchlock.net.proxy; "
            "print(sorted(m for m in ('dns.message', 'dns.resolver', 'dns.asyncresolver') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
