"""Streamed file transfers of this project's SDK (`write_file_stream` / `read_file_stream`,
over the binary data channel or as base64 JSON lines) against real VMs: 64 MiB each way
byte-exact, sync and async; files over read_file's 16 MiB; errors; transfers that are cut
short leave no stuck channel, no partial file, and the sandbox answers at once."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from matchlock import AsyncClient, Client, Config, RPCError, Sandbox

from .conftest import MATCHLOCK
from .rpc_util import BUILTIN, Rpc, error, wait_no_leftovers

pytestmark = pytest.mark.vm
CONFIG = Config(binary_path=MATCHLOCK)
MiB = 1 << 20


@pytest.fixture(scope="module")
def ro_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ro")
    (d / "kept").write_bytes(b"host file")
    return d


@pytest.fixture(scope="module")
def client(state_dir: Path, ro_dir: Path) -> Iterator[Client]:
    c = Client(CONFIG)
    c.start()
    try:
        c.launch(Sandbox(BUILTIN).with_workspace("/ro")
                 .mount_host_dir_readonly("/ro", str(ro_dir)))
        yield c
    finally:
        c.close()
        c.remove()
    assert wait_no_leftovers(state_dir) == []


def _alive(c: Client) -> None:
    """The sandbox answers right away: no channel or request was left stuck."""
    r = c.exec("echo alive", timeout=20)
    assert (r.exit_code, r.stdout) == (0, "alive\n")


def test_64_mib_write_then_read_byte_exact(client: Client) -> None:
    data = os.urandom(64 * MiB)
    assert client._proc.has_data_channel
    client.write_file("/tmp/big", data)
    r = client.exec("wc -c < /tmp/big; sha256sum /tmp/big")
    assert r.stdout.split()[:2] == [str(len(data)), hashlib.sha256(data).hexdigest()]
    back = client.read_file("/tmp/big")
    assert len(back) == len(data) and back == data
    # Into a writer, a chunk at a time, with a limit it stays under.
    sink = io.BytesIO()
    assert client.read_file_to("/tmp/big", sink, limit=64 * MiB) == len(data)
    assert sink.getvalue() == data
    # From a file-like source.
    assert client.write_file_from("/tmp/big2", io.BytesIO(data[: 20 * MiB]), mode=0o600) == 20 * MiB
    r = client.exec("stat -c '%s %a' /tmp/big2; sha256sum < /tmp/big2")
    assert r.stdout.split()[:3] == [str(20 * MiB), "600",
                                    hashlib.sha256(data[: 20 * MiB]).hexdigest()]


def test_64_mib_async(client: Client) -> None:
    data = os.urandom(64 * MiB)

    async def main() -> bytes:
        async with AsyncClient(CONFIG) as ac:
            await ac.launch(Sandbox(BUILTIN))
            await ac.write_file("/tmp/big", data)
            # Several at once on one sandbox: a small read and an exec while a big one runs.
            big, small, r = await asyncio.gather(
                ac.read_file("/tmp/big"), ac.read_file("/etc/hostname"),
                ac.exec("echo side"))
            assert r.stdout == "side\n" and small
            await ac.close()
            await ac.remove()
            return big

    assert asyncio.run(main()) == data


def test_base64_path_without_the_data_channel(client: Client) -> None:
    """`use_sudo` clients (sudo closes inherited descriptors) stream as JSON lines: the same
    methods, the same results; checked here on a client without the channel."""
    c = Client(CONFIG)
    c.start()
    assert c._rpc is not None
    c._rpc.shutdown(1)
    from matchlock.sdk.transport import RPCProcess

    c._rpc = RPCProcess(c._argv("rpc"), None, data_channel=False)
    try:
        c.launch(Sandbox(BUILTIN))
        data = os.urandom(17 * MiB + 3)
        c.write_file("/tmp/b", data)
        assert c.read_file("/tmp/b") == data
        with pytest.raises(RPCError) as e:
            c.read_file("/nope")
        assert e.value.is_file_error()
    finally:
        c.close()
        c.remove()


def test_errors(client: Client) -> None:
    for path, what in (("/no/such/file", "No such file"), ("/tmp", "Is a directory"),
                       ("/dev/null", "not a regular file")):
        with pytest.raises(RPCError) as e:
            client.read_file(path)
        assert e.value.is_file_error() and path in e.value.message and what in e.value.message
    # A read-only mount: refused, nothing written, the host file untouched.
    with pytest.raises(RPCError) as e:
        client.write_file("/ro/new", os.urandom(3 * MiB))
    assert e.value.is_file_error() and "Read-only file system" in e.value.message
    with pytest.raises(RPCError) as e:
        client.write_file_from("/ro/kept", b"x" * 10)
    assert e.value.is_file_error()
    assert client.exec("ls -A /ro").stdout.split() == ["kept"]
    # Bigger than the caller's limit.
    client.exec("head -c 3000000 /dev/zero > /tmp/three")
    with pytest.raises(RPCError) as e:
        client.read_file_to("/tmp/three", io.BytesIO(), limit=1 << 20)
    assert e.value.is_file_error() and "exceeds 1048576 bytes" in e.value.message
    _alive(client)


def test_a_file_that_changes_during_the_read(client: Client) -> None:
    # Shrinks: the read ends where the file now ends, no hang.
    client.exec("head -c 30000000 /dev/urandom > /tmp/shrink")
    got = io.BytesIO()
    client.exec("(sleep 0.05; : > /tmp/shrink) </dev/null >/dev/null 2>&1 &")
    n = client.read_file_to("/tmp/shrink", got)
    assert n == len(got.getvalue()) <= 30_000_000
    # Grows without end: the caller's limit ends it (or the read caught up with the writer).
    pid = client.exec("(while :; do head -c 65536 /dev/zero; done >> /tmp/grow) "
                      "</dev/null >/dev/null 2>&1 & echo $!").stdout.strip()
    try:
        got = io.BytesIO()
        try:
            client.read_file_to("/tmp/grow", got, limit=8 * MiB, timeout=60)
        except RPCError as e:
            assert e.is_file_error() and "exceeds 8388608 bytes: /tmp/grow" in e.message
        assert len(got.getvalue()) <= 8 * MiB
    finally:
        client.exec(f"kill {pid}")
    _alive(client)


class _Boom(Exception):
    pass


class _FailingSource(io.RawIOBase):
    """Gives `fail_after` bytes, then fails (the caller's data source breaks mid-way)."""

    def __init__(self, fail_after: int) -> None:
        self.left = fail_after

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            raise _Boom("source broke")
        k = min(self.left, n if n > 0 else 1 << 20)
        self.left -= k
        return b"z" * k


class _FailingWriter(io.RawIOBase):
    def __init__(self) -> None:
        self.got = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.got += len(b)
        if self.got > 2 * MiB:
            raise _Boom("disk full")
        return len(b)


def test_transfers_cut_short_leave_nothing_stuck(client: Client) -> None:
    client.write_file("/tmp/cut/old", b"previous")
    with pytest.raises(_Boom):
        client.write_file_from("/tmp/cut/old", _FailingSource(5 * MiB))
    _alive(client)
    # The guest dropped the partial file: the old content stays, no temporary file is left.
    assert client.read_file("/tmp/cut/old") == b"previous"
    assert client.exec("ls -A /tmp/cut").stdout.split() == ["old"]

    client.exec("head -c 40000000 /dev/zero > /tmp/cut/big")
    with pytest.raises(_Boom):
        client.read_file_to("/tmp/cut/big", _FailingWriter())
    _alive(client)

    # A timeout cancels the transfer in the sandbox; the next one works.
    with pytest.raises(TimeoutError):
        client.write_file_from("/tmp/cut/slow", _SlowSource(), timeout=1.0)
    _alive(client)
    assert "slow" not in client.exec("ls -A /tmp/cut").stdout
    assert client.read_file("/tmp/cut/old") == b"previous"


class _SlowSource(io.RawIOBase):
    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        import time

        time.sleep(0.3)
        return b"s" * 1000


def test_reference_methods_unchanged(state_dir: Path) -> None:
    """Raw JSON-RPC, as the official SDK speaks it: `read_file` still stops at 16 MiB with
    the reference's message; `read_file_stream` (no data channel: base64 notifications)
    returns the same file whole; bad base64 content fails the transfer."""
    rpc = Rpc()
    try:
        rpc.create({"image": BUILTIN})
        rpc.call("exec", {"command": "head -c 17000000 /dev/urandom > /tmp/f; sync"}, rid=2)
        assert error(rpc.call("read_file", {"path": "/tmp/f"}, rid=3)) == (
            -32002, "read_file exceeds 16777216 bytes: /tmp/f")
        rpc.send("read_file_stream", {"path": "/tmp/f"}, 4)
        answer, before = rpc.until(4)
        assert answer["result"] == {"size": 17_000_000}
        content = b"".join(base64.b64decode(m["params"]["data"]) for m in before)
        sha = rpc.call("exec", {"command": "sha256sum < /tmp/f"}, rid=5)["result"]["stdout"]
        assert hashlib.sha256(content).hexdigest() == base64.b64decode(sha).decode().split()[0]
        assert all(m["method"] == "read_file_stream.data" for m in before)
        # Content as JSON lines; a bad chunk fails the request, no file appears.
        rpc.send("write_file_stream", {"path": "/tmp/w"}, 6)
        rpc.send("write_file_stream.data", {"id": 6, "data": base64.b64encode(b"ab").decode()}, 7)
        rpc.send("write_file_stream.data", {"id": 6, "data": "%%%"}, 8)
        assert error(rpc.until(6)[0]) == (-32602, "invalid base64 in data")
        assert error(rpc.call("read_file", {"path": "/tmp/w"}, rid=9))[0] == -32002
        rpc.send("write_file_stream", {"path": "/tmp/w"}, 10)
        rpc.send("write_file_stream.data", {"id": 10, "data": base64.b64encode(b"ab").decode()}, 11)
        rpc.send("write_file_stream.end", {"id": 10}, 12)
        assert rpc.until(10)[0]["result"] == {"size": 2}
        # The data channel is not there: asking for it is a clear error.
        assert error(rpc.call("read_file_stream", {"path": "/tmp/w", "via": "fd"}, rid=13)) == (
            -32602, 'via "fd" needs the data channel (MATCHLOCK_RPC_DATA_FDS)')
        assert error(rpc.call("read_file_stream", {"path": "/tmp/w"}, rid=None)) == (  # type: ignore[arg-type]
            -32600, "read_file_stream requires a request id")
    finally:
        rpc.close_stdin()
        assert rpc.finish() == 0
