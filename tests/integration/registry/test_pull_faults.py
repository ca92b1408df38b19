"""Hostile and broken conditions: tampered blobs, malicious layers, dropped connections, a
killed pull, a full disk, concurrent pulls. Each must fail cleanly or recover, and leave a
cache that a later pull can use without manual cleanup."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from matchlock.errors import ImageError
from matchlock.image.progress import PullProgress
from matchlock.image.pull import pull_image
from matchlock.image.registry_config import RegistrySettings
from matchlock.image.store import ImageStore
from tests.integration.registry.conftest import MATCHLOCK, CliRun, one_error_line
from tests.integration.registry.images import Image, make_image, skopeo_push, write_layout
from tests.integration.registry.servers import FaultProxy, RegistryServer
from tests.unit.image_testutil import dir_, hardlink, reg, symlink, tar_bytes


def _push(registry: RegistryServer, image: Image, name: str, tmp_path: Path) -> str:
    layout = tmp_path / f"layout-{name.replace('/', '_').replace(':', '_')}"
    write_layout(layout, "img", [image], as_index=False)
    skopeo_push(layout, "img", f"{registry.address}/{name}")
    return f"{registry.address}/{name}"


def _good_image(marker: bytes) -> Image:
    return make_image([tar_bytes(dir_("etc"), reg("etc/marker", marker))])


@dataclass(frozen=True)
class BigImage:
    name: str  # as pulled directly from the registry
    layer: str  # digest of its one 8 MB (incompressible) layer


@pytest.fixture(scope="session")
def big_image(plain_registry: RegistryServer, work: Path) -> BigImage:
    """Large enough to interrupt halfway, small enough to unpack in no time."""
    image = make_image([tar_bytes(dir_("data"), reg("data/random", os.urandom(8 << 20)))])
    name = _push(plain_registry, image, "big:1", work)
    return BigImage(name, "sha256:" + hashlib.sha256(image.layers[0]).hexdigest())


def _via(proxy: FaultProxy, name: str) -> str:
    return name.replace(name.split("/")[0], proxy.address)


@pytest.fixture
def proxy(plain_registry: RegistryServer) -> Iterator[FaultProxy]:
    p = FaultProxy(plain_registry.port)
    yield p
    p.stop()


def _blob_files_are_intact(store: ImageStore) -> None:
    for path in (store.root / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name


# -- tampering and malicious content -----------------------------------------------------


def test_tampered_blob_is_refused_and_never_stored(
    store: ImageStore, settings: RegistrySettings, plain_registry: RegistryServer,
    tmp_path: Path,
) -> None:
    image = _good_image(os.urandom(4096))
    name = _push(plain_registry, image, "tampered:1", tmp_path)
    layer_digest = "sha256:" + hashlib.sha256(image.layers[0]).hexdigest()
    blob = plain_registry.blob_file(layer_digest)
    original = blob.read_bytes()
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0xFF  # same size, different bytes
    blob.write_bytes(bytes(tampered))
    try:
        with pytest.raises(ImageError, match="tampered with") as caught:
            pull_image(store, name, settings=settings)
        assert layer_digest in str(caught.value)
        assert not store.has_blob(layer_digest)
        assert store.list() == []
        assert list(store.tmp_dir.iterdir()) == []
    finally:
        blob.write_bytes(original)
    pulled = pull_image(store, name, settings=settings)  # the real blob works afterwards
    assert store.rootfs_path(pulled).is_file()


def _malicious_layers() -> dict[str, bytes]:
    def abs_tar(member: str) -> bytes:
        # tarfile strips a leading "/" when writing names, so set the raw field by hand.
        raw = bytearray(tar_bytes(reg("x" * len(member), b"evil")))
        raw[: len(member)] = member.encode()
        header = raw[:512]
        header[148:156] = b" " * 8
        checksum = sum(header)
        raw[148:156] = f"{checksum:06o}\0 ".encode()
        return bytes(raw)

    return {
        "traversal": tar_bytes(reg("../escaped", b"evil")),
        "deep-traversal": tar_bytes(dir_("a"), reg("a/../../escaped", b"evil")),
        "absolute": abs_tar("/etc/escaped"),
        "symlink-escape": tar_bytes(symlink("link", "/"), reg("link/escaped", b"evil")),
        "relative-symlink-escape": tar_bytes(dir_("a"), symlink("a/up", "../../.."),
                                             reg("a/up/escaped", b"evil")),
        "hardlink-escape": tar_bytes(hardlink("passwd", "../../../etc/passwd")),
        "hardlink-absolute": tar_bytes(hardlink("passwd", "/etc/passwd")),
        "hardlink-through-symlink": tar_bytes(symlink("etc", "/etc"),
                                              hardlink("passwd", "etc/passwd")),
    }


@pytest.mark.parametrize("kind", sorted(_malicious_layers()))
def test_malicious_layer_is_rejected_and_the_cache_stays_usable(
    store: ImageStore, settings: RegistrySettings, plain_registry: RegistryServer,
    tmp_path: Path, kind: str,
) -> None:
    tar = _malicious_layers()[kind]
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        assert t.getmembers()  # the crafted tar is readable
    evil = make_image([tar_bytes(dir_("etc"), reg("etc/base", b"ok")), tar])
    name = _push(plain_registry, evil, f"evil-{kind}:1", tmp_path)
    with pytest.raises(ImageError, match="refusing layer"):
        pull_image(store, name, settings=settings)
    assert store.lookup(name) is None
    assert not any(store.rootfs_path(i).exists() for i in store.list())
    assert not (store.root / "rootfs" / f"{evil.digest.split(':')[1]}.ext4").exists()
    assert not Path("/escaped").exists() and not (tmp_path.parent / "escaped").exists()
    assert [p for p in store.tmp_dir.iterdir()] == []

    # The publisher fixes the tag: the next pull just works.
    _push(plain_registry, _good_image(b"fixed"), f"evil-{kind}:1", tmp_path)
    fixed = pull_image(store, name, settings=settings)
    assert store.rootfs_path(fixed).is_file()
    store.remove(name)
    assert store.gc() > 0  # the rejected blobs were never referenced: gc reclaims them


def test_malicious_layer_cli_error_is_one_line(cli: CliRun, plain_registry: RegistryServer,
                                               tmp_path: Path) -> None:
    evil = make_image([_malicious_layers()["symlink-escape"]])
    name = _push(plain_registry, evil, "evil-cli:1", tmp_path)
    error = one_error_line(cli("pull", "-q", name))
    assert "refusing layer" in error and "symlink" in error


# -- interrupted downloads ------------------------------------------------------------------


def _once(action: str, digest: str) -> Callable[[str], str | None]:
    """A proxy fault that hits the first request for `digest` only."""
    done: set[str] = set()

    def fault(path: str) -> str | None:
        if path.endswith(digest) and digest not in done:
            done.add(digest)
            return action
        return None

    return fault


def test_dropped_connection_resumes_with_range(
    store: ImageStore, settings: RegistrySettings, big_image: BigImage, proxy: FaultProxy,
) -> None:
    proxy.fault = _once("cut", big_image.layer)
    progress = PullProgress()
    image = pull_image(store, _via(proxy, big_image.name), settings=settings, progress=progress)
    assert store.rootfs_path(image).is_file()
    requests = [e for e in proxy.log if e.path.endswith(big_image.layer)]
    assert len(requests) == 2 and requests[0].range is None
    assert requests[1].range is not None and requests[1].status == 206
    resumed_at = int(requests[1].range.removeprefix("bytes=").rstrip("-"))
    assert resumed_at > 0
    assert progress.downloaded == image.size  # no byte fetched twice


def test_server_ignoring_range_restarts_cleanly(
    store: ImageStore, settings: RegistrySettings, big_image: BigImage, proxy: FaultProxy,
) -> None:
    seen: list[str] = []

    def fault(path: str) -> str | None:
        if not path.endswith(big_image.layer):
            return None
        seen.append(path)
        return "cut" if len(seen) == 1 else "no-range"

    proxy.fault = fault
    image = pull_image(store, _via(proxy, big_image.name), settings=settings)
    assert store.rootfs_path(image).is_file()
    requests = [e for e in proxy.log if e.path.endswith(big_image.layer)]
    assert [r.status for r in requests] == [200, 200] and requests[1].range is not None
    _blob_files_are_intact(store)


def test_corrupt_partial_file_is_discarded(
    store: ImageStore, settings: RegistrySettings, big_image: BigImage, proxy: FaultProxy,
) -> None:
    partial = store.tmp_dir / f"pull-{big_image.layer.split(':')[1]}.partial"
    partial.write_bytes(os.urandom(1 << 20))  # left by "an earlier pull", but garbage
    image = pull_image(store, _via(proxy, big_image.name), settings=settings)
    assert store.rootfs_path(image).is_file()
    requests = [e for e in proxy.log if e.path.endswith(big_image.layer)]
    assert [r.range for r in requests] == [f"bytes={1 << 20}-", None]
    assert not partial.exists()
    _blob_files_are_intact(store)


def test_killed_pull_resumes_from_its_partial_file(
    cli: CliRun, cli_env: dict[str, str], big_image: BigImage, proxy: FaultProxy, tmp_path: Path,
) -> None:
    proxy.fault = _once("stall", big_image.layer)
    name = _via(proxy, big_image.name)
    partial = (tmp_path / "cache" / "images" / "tmp"
               / f"pull-{big_image.layer.split(':')[1]}.partial")
    proc = subprocess.Popen([MATCHLOCK, "pull", "-q", name], env=cli_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proxy.stalled.wait(60), "the pull never reached the big layer"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # half the blob is sent; wait until it is on disk
            size = partial.stat().st_size if partial.exists() else 0
            if size >= 2 << 20:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proxy.release.set()
    kept = partial.stat().st_size
    assert kept >= 2 << 20
    r = cli("pull", "-q", name)
    assert r.returncode == 0, r.stderr
    requests = [e for e in proxy.log if e.path.endswith(big_image.layer)]
    assert requests[-1].range == f"bytes={kept}-" and requests[-1].status == 206
    assert not partial.exists()
    _blob_files_are_intact(ImageStore(tmp_path / "cache" / "images"))


# -- disk full, concurrency ---------------------------------------------------------------


@pytest.fixture
def tiny_cache(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tiny"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {r.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_is_one_line_and_leaves_no_partials(
    cli: CliRun, python_pushed: str, tiny_cache: Path,
) -> None:
    r = cli("pull", "-q", python_pushed, env={"MATCHLOCK_CACHE_DIR": str(tiny_cache)})
    error = one_error_line(r)
    assert "disk full" in error and "image gc" in error
    leftovers = list((tiny_cache / "images" / "tmp").iterdir())
    assert leftovers == []
    blobs = tiny_cache / "images" / "blobs" / "sha256"
    for path in blobs.iterdir():  # whatever finished before the disk filled up is intact
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name


def test_concurrent_pulls_of_one_image(cli_env: dict[str, str], big_image: BigImage,
                                       python_pushed: str, tmp_path: Path) -> None:
    # Two images, so the pulls also overlap with different blobs in flight.
    names = [big_image.name, python_pushed, big_image.name, python_pushed]
    procs = [subprocess.Popen([MATCHLOCK, "pull", "-q", name], env=cli_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name in names]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (_out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err.decode()
    assert results[0][0] == results[2][0] and results[1][0] == results[3][0]
    store = ImageStore(tmp_path / "cache" / "images")
    images = store.list()
    assert len(images) == 2 and all(store.rootfs_path(i).is_file() for i in images)
    assert list(store.tmp_dir.iterdir()) == []
    _blob_files_are_intact(store)
