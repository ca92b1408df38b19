"""One failed or slow channel never stalls the connection, and `--timeout` always ends a run.

Reproduces a hang found in review: an image whose CA bundle is larger than the sandbox will
merge (20 MiB) made the host abandon its FILE_READ mid-stream with the channel still open;
the reader thread then blocked on that channel's full queue, every later answer stalled, and
`run --timeout 5` hung until it was killed from outside.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import MATCHLOCK, leftovers
from .layouts import write_layout_with_layer

pytestmark = pytest.mark.vm
Run = Callable[..., subprocess.CompletedProcess[bytes]]
BUNDLE = "etc/ssl/certs/ca-certificates.crt"


def _bundle_layer(size: int) -> bytes:
    """A small gzip layer holding a `size`-byte CA bundle (one PEM block, repeated)."""
    pem = (b"-----BEGIN CERTIFICATE-----\n" + b"QUJD" * 16 + b"\n"
           b"-----END CERTIFICATE-----\n")
    data = (pem * (size // len(pem) + 1))[:size]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("etc", "etc/ssl", "etc/ssl/certs"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        info = tarfile.TarInfo(BUNDLE)
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
    return gzip.compress(out.getvalue(), mtime=0)


def write_layout_with_bundle(dest: Path, size: int) -> None:
    """The built-in busybox image plus one layer with a `size`-byte CA bundle."""
    write_layout_with_layer(dest, _bundle_layer(size))


@pytest.fixture(scope="module")
def big_bundle_image(state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    layout = tmp_path_factory.mktemp("bigca") / "layout"
    write_layout_with_bundle(layout, 20 << 20)
    assert sum(f.stat().st_size for f in layout.rglob("*") if f.is_file()) < 4 << 20
    r = subprocess.run([MATCHLOCK, "image", "import", "bigca:1", str(layout)],
                       capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()
    # The first run builds the root filesystem (and says so on stderr); the network's CA
    # install is what reads the bundle, so this one works.
    r = subprocess.run([MATCHLOCK, "run", "--no-network", "--image", "bigca:1", "--",
                        "wc", "-c", "/" + BUNDLE], capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.split()[0] == str(20 << 20).encode()
    return "bigca:1"


def _one_error_line(stderr: bytes) -> bytes:
    assert b"Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(b"matchlock: "), stderr
    return lines[0]


def test_oversized_ca_bundle_ends_the_run_promptly(ml: Run, big_bundle_image: str) -> None:
    start = time.monotonic()
    r = ml("run", "--image", big_bundle_image, "--timeout", "5", "--", "true", timeout=60)
    elapsed = time.monotonic() - start
    assert r.returncode != 0
    line = _one_error_line(r.stderr)
    assert b"CA bundle" in line or b"timed out after 5s" in line, line
    assert elapsed < 30, elapsed


def test_oversized_ca_bundle_without_timeout_is_one_line(ml: Run, big_bundle_image: str) -> None:
    r = ml("run", "--image", big_bundle_image, "--", "true", timeout=120)
    assert r.returncode == 1
    line = _one_error_line(r.stderr)
    assert b"CA bundle" in line and b"/etc/ssl/certs/ca-certificates.crt" in line, line


def _vmm_pid(state_dir: Path, deadline: float) -> int:
    import sqlite3

    while time.monotonic() < deadline:
        with contextlib.suppress(sqlite3.Error), \
                contextlib.closing(sqlite3.connect(state_dir / "state.db", timeout=5)) as db:
            row = db.execute("SELECT vmm_pid FROM sandboxes WHERE vmm_pid > 0"
                             " AND phase NOT IN ('stopped', 'crashed', 'removed')"
                             " ORDER BY created DESC").fetchone()
            if row:
                return int(row[0])
        time.sleep(0.05)
    raise AssertionError("no VMM appeared")


def test_sigterm_ends_a_run_whose_command_ignores_it(state_dir: Path) -> None:
    # Forwarded, ignored by the guest command, then KILL after the grace period.
    proc = subprocess.Popen([MATCHLOCK, "run", "--", "sh", "-c",
                             "trap '' TERM INT; echo ready; sleep 600"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == 137, err
    assert b"Traceback" not in err
    assert leftovers(state_dir) == []


def test_losing_the_vm_is_one_line(state_dir: Path) -> None:
    proc = subprocess.Popen([MATCHLOCK, "run", "--", "sh", "-c", "echo ready; sleep 600"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    os.kill(_vmm_pid(state_dir, time.monotonic() + 10), signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert _one_error_line(err) == b"matchlock: the VM process was killed by signal 9"
    assert leftovers(state_dir) == []
