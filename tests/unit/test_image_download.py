"""Resumable, verified blob downloads, against a scripted fake registry client."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from matchlock.errors import ImageError
from matchlock.image import download
from matchlock.image.download import (
    BlobDownload,
    Cancelled,
    Control,
    DiskFull,
    exclusive_file_lock,
)
from matchlock.image.oci import OCI_LAYER_GZIP, Descriptor
from matchlock.image.progress import PullProgress
from matchlock.image.registry import BlobResponse, RangeNotSatisfiable
from matchlock.image.store import ImageStore

DATA = os.urandom(10_000)
DESC = Descriptor(OCI_LAYER_GZIP, "sha256:" + hashlib.sha256(DATA).hexdigest(), len(DATA))


class FakeClient:
    """Serves `data`; each request follows the next step of `script`:
    "ok", "cut:N" (drop the connection after N bytes), "ignore-range", "416"."""

    registry = "fake.test"

    def __init__(self, data: bytes = DATA, script: list[str] | None = None) -> None:
        self.data = data
        self.script = list(script or [])
        self.requests: list[int] = []

    @contextlib.contextmanager
    def blob(self, digest: str, offset: int, what: str) -> Iterator[BlobResponse]:
        self.requests.append(offset)
        action = self.script.pop(0) if self.script else "ok"
        if action == "416":
            raise RangeNotSatisfiable()
        start = 0 if action == "ignore-range" else offset
        body = self.data[start:]

        def chunks() -> Iterator[bytes]:
            limit = int(action[4:]) if action.startswith("cut:") else len(body)
            for i in range(0, limit, 1000):
                yield body[i : min(i + 1000, limit)]
            if limit < len(body):
                raise httpx.RemoteProtocolError("peer closed connection")

        yield BlobResponse(start, chunks())


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_BACKOFF_S", 0.001)


def _run(store: ImageStore, client: FakeClient, desc: Descriptor = DESC,
         control: Control | None = None) -> PullProgress:
    progress = PullProgress()
    progress.begin([(desc.digest, desc.size)], set())
    job = BlobDownload(store, client, desc, "layer 1/1", progress, control)  # type: ignore[arg-type]
    job.run()
    return progress


def _partial(store: ImageStore) -> Path:
    return store.tmp_dir / f"pull-{DESC.digest.split(':')[1]}.partial"


def _stored(store: ImageStore) -> bool:
    return store.has_blob(DESC.digest) and store.blob_path(DESC.digest).read_bytes() == DATA


def test_plain_download(store: ImageStore) -> None:
    client = FakeClient()
    progress = _run(store, client)
    assert _stored(store) and client.requests == [0] and progress.downloaded == len(DATA)
    assert list(store.tmp_dir.iterdir()) == []
    assert oct(store.blob_path(DESC.digest).stat().st_mode & 0o777) == "0o644"


def test_present_blob_is_not_fetched(store: ImageStore) -> None:
    store.put_blob_stream(io.BytesIO(DATA), DESC.digest)
    client = FakeClient()
    _run(store, client)
    assert client.requests == []


def test_dropped_connection_resumes(store: ImageStore) -> None:
    client = FakeClient(script=["cut:3000"])
    progress = _run(store, client)
    assert _stored(store) and client.requests == [0, 3000]
    assert progress.downloaded == len(DATA)


def test_partial_from_an_earlier_pull_is_resumed(store: ImageStore) -> None:
    _partial(store).write_bytes(DATA[:5000])
    client = FakeClient()
    progress = _run(store, client)
    assert _stored(store) and client.requests == [5000]
    assert progress.downloaded == len(DATA) - 5000


def test_server_ignoring_range_restarts(store: ImageStore) -> None:
    _partial(store).write_bytes(DATA[:5000])
    client = FakeClient(script=["ignore-range"])
    _run(store, client)
    assert _stored(store) and client.requests == [5000]


def test_corrupt_partial_is_discarded_and_fetched_again(store: ImageStore) -> None:
    _partial(store).write_bytes(os.urandom(5000))
    client = FakeClient()
    _run(store, client)
    assert _stored(store) and client.requests == [5000, 0]


def test_oversized_partial_is_discarded(store: ImageStore) -> None:
    _partial(store).write_bytes(DATA + b"trailing garbage")
    client = FakeClient()
    _run(store, client)
    assert _stored(store) and client.requests == [0]


def test_complete_partial_is_only_verified(store: ImageStore) -> None:
    _partial(store).write_bytes(DATA)
    client = FakeClient()
    _run(store, client)
    assert _stored(store) and client.requests == []


def test_range_not_satisfiable_restarts(store: ImageStore) -> None:
    _partial(store).write_bytes(DATA[:5000])
    client = FakeClient(script=["416"])
    _run(store, client)
    assert _stored(store) and client.requests == [5000, 0]


def test_tampered_blob_is_refused_and_discarded(store: ImageStore) -> None:
    bad = bytearray(DATA)
    bad[1234] ^= 1
    client = FakeClient(bytes(bad))
    with pytest.raises(ImageError, match="tampered with; it was discarded"):
        _run(store, client)
    assert client.requests == [0]  # a fresh download is not retried
    assert not store.has_blob(DESC.digest) and list(store.tmp_dir.iterdir()) == []


def test_blob_larger_than_its_descriptor_is_refused(store: ImageStore) -> None:
    client = FakeClient(DATA + b"more")
    with pytest.raises(ImageError, match="larger than the 10000 bytes"):
        _run(store, client)
    assert not store.has_blob(DESC.digest) and list(store.tmp_dir.iterdir()) == []


def test_too_many_failures_keep_the_partial_for_later(store: ImageStore) -> None:
    client = FakeClient(script=["cut:1000"] * 10)
    with pytest.raises(ImageError, match="failed 5 times; last error: peer closed"):
        _run(store, client)
    assert client.requests == [0, 1000, 2000, 3000, 4000]
    assert _partial(store).read_bytes() == DATA[:5000]
    _run(store, FakeClient())  # a later pull finishes it
    assert _stored(store)


class _FullDisk(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full(store: ImageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Path.open

    def fake_open(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if self.name.endswith(".partial") and "b" in mode and ("w" in mode or "a" in mode):
            original(self, mode).close()  # the file exists, like a real partial write
            return _FullDisk()
        return original(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", fake_open)
    with pytest.raises(DiskFull, match="disk full while downloading layer 1/1"):
        _run(store, FakeClient())
    assert list(store.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("discard", [False, True])
def test_cancel_keeps_or_discards_the_partial(store: ImageStore, discard: bool) -> None:
    control = Control()
    client = FakeClient()

    class Cancelling(FakeClient):
        @contextlib.contextmanager
        def blob(self, digest: str, offset: int, what: str) -> Iterator[BlobResponse]:
            with client.blob(digest, offset, what) as response:
                def chunks() -> Iterator[bytes]:
                    for i, chunk in enumerate(response.chunks):
                        if i == 3:
                            if discard:
                                control.discard.set()
                            control.cancel.set()
                        yield chunk
                yield BlobResponse(response.start, chunks())

    with pytest.raises(Cancelled):
        _run(store, Cancelling(), control=control)
    assert _partial(store).exists() is not discard
    assert not store.has_blob(DESC.digest)


def test_exclusive_file_lock_serialises_and_cleans_up(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    order: list[str] = []
    first_holds = threading.Event()

    def second() -> None:
        first_holds.wait()
        with exclusive_file_lock(lock):
            order.append("second")

    thread = threading.Thread(target=second)
    thread.start()
    with exclusive_file_lock(lock):
        first_holds.set()
        time.sleep(0.2)
        order.append("first")
    thread.join(10)
    assert order == ["first", "second"] and not lock.exists()
