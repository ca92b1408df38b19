"""The content-addressed store: blobs, names, rootfs artifacts and garbage collection."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest
from image_testutil import debugfs, debugfs_stat, digest, requires_root

from matchlock.errors import ImageError
from matchlock.image.builtin import BUILTIN_TAG, ensure_builtin
from matchlock.image.ext4 import make_ext4
from matchlock.image.store import ImageStore, StoredImage


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


def _put(store: ImageStore, data: bytes) -> str:
    return store.put_blob_stream(io.BytesIO(data), None)


def test_default_root_follows_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATCHLOCK_CACHE_DIR", str(tmp_path / "cache"))
    assert ImageStore().root == tmp_path / "cache" / "images"
    assert (tmp_path / "cache/images/images.db").is_file()


def test_put_blob_verifies_and_is_content_addressed(store: ImageStore) -> None:
    d = store.put_blob_stream(io.BytesIO(b"hello"), digest(b"hello"))
    assert d == digest(b"hello") and store.has_blob(d)
    assert store.blob_path(d).read_bytes() == b"hello"
    assert store.blob_path(d) == store.root / "blobs/sha256" / d.split(":")[1]
    assert _put(store, b"other") == digest(b"other")
    with pytest.raises(ImageError, match="tampered"):
        store.put_blob_stream(io.BytesIO(b"evil"), digest(b"good"))
    assert not store.has_blob(digest(b"good")) and not store.has_blob(digest(b"evil"))
    assert list(store.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("bad", ["sha256:../../etc", "sha256:" + "A" * 64, "md5:00", "x"])
def test_bad_digests_never_become_paths(store: ImageStore, bad: str) -> None:
    with pytest.raises(ImageError, match="invalid"):
        store.blob_path(bad)
    with pytest.raises(ImageError):
        store.put_blob_stream(io.BytesIO(b""), bad)


def _fake_image(store: ImageStore, name: str, seed: bytes) -> StoredImage:
    config = _put(store, b'{"config": {"Cmd": ["sh"]}, "seed": "' + seed + b'"}')
    layer = _put(store, b"layer" + seed)
    manifest = _put(store, b"manifest" + seed)
    return store.tag(name, manifest, config, [layer])


def test_tag_lookup_canonical_forms(store: ImageStore) -> None:
    image = _fake_image(store, "busybox", b"1")
    assert image.size == len(b"layer1") and image.canonical == "docker.io/library/busybox:latest"
    for name in (
        "busybox",
        "busybox:latest",
        "library/busybox",
        "docker.io/library/busybox:latest",
    ):
        found = store.lookup(name)
        assert found is not None and found.manifest_digest == image.manifest_digest
        assert found.name == "busybox"
    assert store.lookup("busybox:other") is None
    assert store.config(image).cmd == ("sh",)


def test_retag_replaces(store: ImageStore) -> None:
    _fake_image(store, "app:v1", b"1")
    second = _fake_image(store, "docker.io/library/app:v1", b"2")
    assert [i.manifest_digest for i in store.list()] == [second.manifest_digest]


def test_tag_refuses_missing_blobs_and_digest_names(store: ImageStore) -> None:
    blob = _put(store, b"x")
    with pytest.raises(ImageError, match="not in the image store"):
        store.tag("app", blob, blob, [digest(b"missing")])
    with pytest.raises(ImageError, match="digest"):
        store.tag("app@" + blob, blob, blob, [blob])
    with pytest.raises(ImageError, match="invalid image reference"):
        store.tag("Bad Name", blob, blob, [blob])


def test_list_and_remove(store: ImageStore) -> None:
    _fake_image(store, "b", b"1")
    _fake_image(store, "a:1", b"2")
    assert [i.name for i in store.list()] == ["a:1", "b"]
    assert store.remove("docker.io/library/b:latest")
    assert not store.remove("b")
    assert [i.name for i in store.list()] == ["a:1"]


def test_gc_frees_unreferenced_blobs_and_rootfs(store: ImageStore) -> None:
    keep = _fake_image(store, "keep", b"k")
    drop = _fake_image(store, "drop", b"d")
    stray = _put(store, b"s" * 100_000)
    orphan_rootfs = store.root / "rootfs" / f"{drop.manifest_digest.split(':')[1]}.ext4"
    orphan_rootfs.write_bytes(b"\0" * 50_000)
    (store.tmp_dir / "rootfs-leftover").mkdir()
    (store.tmp_dir / "rootfs-leftover/file").write_bytes(b"x" * 10_000)
    assert store.remove("drop")

    freed = store.gc()

    assert freed >= 100_000 + 50_000 + 10_000
    for d in (keep.manifest_digest, keep.config_digest, *keep.layers):
        assert store.has_blob(d)
    for d in (drop.manifest_digest, drop.config_digest, *drop.layers, stray):
        assert not store.has_blob(d)
    assert not orphan_rootfs.exists() and list(store.tmp_dir.iterdir()) == []
    assert store.gc() == 0


@requires_root
def test_rootfs_built_once_and_reused(store: ImageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def counting(source: Path, dest: Path, *, label: str = "rootfs") -> object:
        calls.append(dest)
        return make_ext4(source, dest, label=label)

    monkeypatch.setattr("matchlock.image.store.make_ext4", counting)
    image = ensure_builtin(store)
    logs: list[str] = []
    first = store.rootfs(image, logs.append)
    second = store.rootfs(image, logs.append)
    third = ImageStore(store.root).rootfs(image)
    assert first == second == third
    assert first == store.root / "rootfs" / f"{image.manifest_digest.split(':')[1]}.ext4"
    assert len(calls) == 1
    assert len(logs) == 2 and "building" in logs[0] and "ready" in logs[1]
    assert [p.name for p in store.tmp_dir.iterdir()] == []


@requires_root
def test_rootfs_concurrent_callers_build_once(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []

    def counting(source: Path, dest: Path, *, label: str = "rootfs") -> object:
        calls.append(dest)
        return make_ext4(source, dest, label=label)

    monkeypatch.setattr("matchlock.image.store.make_ext4", counting)
    image = ensure_builtin(store)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ImageStore(store.root).rootfs(image)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1 and len(calls) == 1


@requires_root
def test_builtin_rootfs_content(store: ImageStore) -> None:
    image = ensure_builtin(store)
    assert ensure_builtin(store) == image
    assert store.lookup(BUILTIN_TAG) == image
    ext4 = store.rootfs(image)
    busybox = debugfs_stat(ext4, "/bin/busybox")
    assert (busybox["Type"], busybox["Mode"], busybox["User"], busybox["Group"]) == (
        "regular",
        "0755",
        "0",
        "0",
    )
    assert int(busybox["Size"]) == Path("/bin/busybox").stat().st_size
    tmp = debugfs_stat(ext4, "/tmp")
    assert (tmp["Type"], int(tmp["Mode"], 8)) == ("directory", 0o1777)
    home = debugfs_stat(ext4, "/home/user")
    assert (home["User"], home["Group"]) == ("1000", "1000")
    assert int(debugfs_stat(ext4, "/root")["Mode"], 8) == 0o700
    assert debugfs_stat(ext4, "/bin/sh")["Type"] == "symlink"
    assert 'Fast link dest: "/bin/busybox"' in debugfs(ext4, "stat /bin/sh")
    passwd = debugfs(ext4, "cat /etc/passwd")
    assert "root:x:0:0:" in passwd and "user:x:1000:1000:user:/home/user:/bin/sh" in passwd
    assert "nobody:x:65534" in passwd
    assert "user:x:1000:" in debugfs(ext4, "cat /etc/group")
    listing = debugfs(ext4, "ls -l /bin")
    assert any(line.split()[-1:] == ["ls"] for line in listing.splitlines())


@requires_root
def test_damaged_image_refused(store: ImageStore) -> None:
    image = ensure_builtin(store)
    store.blob_path(image.layers[0]).unlink()
    with pytest.raises(ImageError, match="damaged"):
        store.rootfs(image)
    # ensure_builtin repairs it.
    assert store.has_blob(ensure_builtin(store).layers[0])


@requires_root
def test_corrupted_layer_blob_refused_at_build(store: ImageStore) -> None:
    image = ensure_builtin(store)
    path = store.blob_path(image.layers[0])
    data = bytearray(path.read_bytes())
    data[-2000] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="tampered"):
        store.rootfs(image)
    assert not list((store.root / "rootfs").glob("*.ext4"))


@requires_root
def test_rootfs_keeps_special_files_and_applies_layers_in_order(store: ImageStore) -> None:
    import tarfile

    from image_testutil import device, dir_, gzipped, hardlink, reg, tar_bytes

    base = gzipped(
        tar_bytes(
            dir_("bin/"),
            reg("bin/su", b"su", mode=0o4755),
            reg("bin/old", b"old"),
            reg("etc/shadow", b"s", mode=0o640, uid=0, gid=42),
            device("dev/null", tarfile.CHRTYPE, 1, 3),
        )
    )
    top = tar_bytes(
        reg("bin/.wh.old"),
        hardlink("bin/su2", "bin/su"),
        reg("app/x", uid=1000, xattrs={"user.origin": "layer2"}),
    )
    layers = [_put(store, base), _put(store, top)]
    config = _put(store, b"{}")
    image = store.tag("special", _put(store, b"m"), config, layers)
    ext4 = store.rootfs(image)
    su = debugfs_stat(ext4, "/bin/su")
    assert int(su["Mode"], 8) == 0o4755
    assert "Links: 2" in debugfs(ext4, "stat /bin/su2")
    assert "File not found" in debugfs_stat_error(ext4, "/bin/old")
    shadow = debugfs_stat(ext4, "/etc/shadow")
    assert (int(shadow["Mode"], 8), shadow["Group"]) == (0o640, "42")
    null = debugfs(ext4, "stat /dev/null")
    assert "Type: character special" in null and "Device major/minor number: 01:03" in null
    assert debugfs_stat(ext4, "/app/x")["User"] == "1000"
    assert "user.origin" in debugfs(ext4, "ea_list /app/x")


def debugfs_stat_error(image: Path, path: str) -> str:
    import subprocess

    result = subprocess.run(
        ["debugfs", "-R", f"stat {path}", str(image)], capture_output=True, text=True
    )
    return result.stdout + result.stderr


def test_rootfs_is_sealed_read_only_at_the_device_size(store: ImageStore) -> None:
    # Sandboxes share the file and must never change it: the store pads it (sparsely) to
    # the fixed device capacity and makes it read-only, once; an older artifact is sealed
    # on its next use.
    import os
    import stat

    from matchlock.image.store import ROOTFS_DEVICE_BYTES

    image = ensure_builtin(store)
    path = store.rootfs(image)
    st = os.stat(path)
    assert st.st_size == ROOTFS_DEVICE_BYTES and stat.S_IMODE(st.st_mode) == 0o444
    assert st.st_blocks * 512 < 64 << 20  # sparse
    os.chmod(path, 0o644)
    os.truncate(path, 10 << 20)  # as an older version left it
    assert store.rootfs(image) == path
    st = os.stat(path)
    assert st.st_size == ROOTFS_DEVICE_BYTES and stat.S_IMODE(st.st_mode) == 0o444
