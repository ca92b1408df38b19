"""Importing docker-save archives and OCI layouts; every blob is verified."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from image_testutil import debugfs, debugfs_stat, digest, gzipped, requires_root

from matchlock.errors import ImageError
from matchlock.image.builtin import build_builtin, write_oci_layout
from matchlock.image.importer import import_image
from matchlock.image.store import ImageStore

TESTDATA = Path(os.environ.get("MATCHLOCK_TESTDATA", Path.home() / ".cache/matchlock-testdata"))
PYTHON_LAYOUT = TESTDATA / "python-3.12-alpine"
PYTHON_MANIFEST = "sha256:a10437c9ceddfb3b4a7a68eb3b58f0e17b9a3b2b7679ae27a0595cb1028b977e"

needs_skopeo = pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo not installed")
needs_python_image = pytest.mark.skipif(
    not (PYTHON_LAYOUT / "index.json").is_file(),
    reason=f"python:3.12-alpine test data absent at {PYTHON_LAYOUT}; run scripts/testdata.sh",
)


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    path = tmp_path / "layout"
    write_oci_layout(path)
    return path


def _tar_dir(src: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w") as tar:
        for item in sorted(src.rglob("*")):
            tar.add(item, arcname=str(item.relative_to(src)), recursive=False)
    return dest


def _tar_files(dest: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(dest, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return dest


def _hex(d: str) -> str:
    return d.split(":", 1)[1]


def _assert_builtin(store: ImageStore, name: str) -> None:
    built = build_builtin()
    image = store.lookup(name)
    assert image is not None
    assert image.layers == (built.layer_digest,)
    assert image.config_digest == built.config_digest
    assert store.config(image).cmd == ("sh",)
    for d in (image.manifest_digest, image.config_digest, *image.layers):
        assert store.has_blob(d)


# -- OCI layouts ---------------------------------------------------------------------------


def test_oci_layout_directory(store: ImageStore, layout: Path) -> None:
    manifest = json.loads((layout / "index.json").read_bytes())["manifests"][0]["digest"]
    image = import_image(store, "busybox:test", layout)
    assert image.manifest_digest == manifest and image.name == "busybox:test"
    _assert_builtin(store, "docker.io/library/busybox:test")
    assert list(store.tmp_dir.iterdir()) == []


def test_oci_layout_tar_and_stdin(store: ImageStore, layout: Path, tmp_path: Path) -> None:
    archive = _tar_dir(layout, tmp_path / "layout.tar")
    import_image(store, "from-file", archive)
    _assert_builtin(store, "from-file")
    import_image(store, "from-stdin", io.BytesIO(archive.read_bytes()))
    _assert_builtin(store, "from-stdin")
    assert list(store.tmp_dir.iterdir()) == []  # the stdin spool is gone


@needs_skopeo
def test_skopeo_oci_archive_with_gzip_layers(
    store: ImageStore, layout: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "oci.tar"
    subprocess.run(
        ["skopeo", "copy", "-q", f"oci:{layout}:busybox", f"oci-archive:{archive}:busybox"],
        check=True,
    )
    image = import_image(store, "gz", archive)
    with store.blob_path(image.layers[0]).open("rb") as f:
        assert f.read(2) == b"\x1f\x8b"
    assert store.config(image).env[0].startswith("PATH=")


def _nested_index(layout: Path, platforms: list[tuple[str, str]]) -> None:
    """Replace index.json with one pointing at a multi-platform index blob."""
    original = json.loads((layout / "index.json").read_bytes())["manifests"][0]
    manifests = []
    for os_name, arch in platforms:
        if arch == "amd64":
            manifests.append(original | {"platform": {"os": os_name, "architecture": arch}})
        else:
            manifests.append(
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": digest(arch.encode()),  # never read: absent on purpose
                    "size": 10,
                    "platform": {"os": os_name, "architecture": arch},
                }
            )
    nested = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }
    ).encode()
    (layout / "blobs/sha256" / _hex(digest(nested))).write_bytes(nested)
    top = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": digest(nested),
                "size": len(nested),
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(top))


def test_multi_platform_index_picks_linux_amd64(store: ImageStore, layout: Path) -> None:
    _nested_index(layout, [("linux", "arm64"), ("unknown", "unknown"), ("linux", "amd64")])
    import_image(store, "multi", layout)
    _assert_builtin(store, "multi")


def test_index_without_amd64_refused(store: ImageStore, layout: Path) -> None:
    _nested_index(layout, [("linux", "arm64"), ("linux", "s390x")])
    with pytest.raises(ImageError, match="no linux/amd64 image"):
        import_image(store, "multi", layout)


def _corrupt(path: Path, offset: int = -1500) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("which", ["layer", "config", "manifest"])
def test_tampered_oci_blob_refused(store: ImageStore, layout: Path, which: str) -> None:
    built = build_builtin()
    target = {
        "layer": built.layer_digest,
        "config": built.config_digest,
        "manifest": built.manifest_digest,
    }[which]
    _corrupt(layout / "blobs/sha256" / _hex(target), offset=-1500 if which == "layer" else -3)
    with pytest.raises(ImageError, match="tampered"):
        import_image(store, "evil", layout)
    assert store.lookup("evil") is None
    assert not store.has_blob(target)
    assert list(store.tmp_dir.iterdir()) == []


def test_size_mismatch_refused(store: ImageStore, layout: Path) -> None:
    index = json.loads((layout / "index.json").read_bytes())
    index["manifests"][0]["size"] += 1
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises(ImageError, match="size"):
        import_image(store, "evil", layout)


def test_other_architecture_refused(store: ImageStore, tmp_path: Path) -> None:
    built = build_builtin()
    config = json.loads(built.config)
    config["architecture"] = "arm64"
    raw_config = json.dumps(config).encode()
    config_name = f"{_hex(digest(raw_config))}.json"
    manifest = {"Config": config_name, "Layers": ["layer.tar"]}
    archive = _tar_files(
        tmp_path / "arm.tar",
        {
            "manifest.json": json.dumps([manifest]).encode(),
            config_name: raw_config,
            "layer.tar": built.layer,
        },
    )
    with pytest.raises(ImageError, match="built for linux/arm64"):
        import_image(store, "arm", archive)


# -- docker save -----------------------------------------------------------------------


@needs_skopeo
def test_skopeo_docker_archive(store: ImageStore, layout: Path, tmp_path: Path) -> None:
    archive = tmp_path / "docker.tar"
    subprocess.run(
        ["skopeo", "copy", "-q", f"oci:{layout}:busybox", f"docker-archive:{archive}:bb:saved"],
        check=True,
    )
    image = import_image(store, "saved", archive)
    _assert_builtin(store, "saved")
    manifest = json.loads(store.blob_path(image.manifest_digest).read_bytes())
    assert manifest["layers"][0]["digest"] == image.layers[0]
    assert manifest["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
    assert manifest["config"]["digest"] == image.config_digest


def _classic_save(tmp_path: Path, *, layer: bytes | None = None) -> Path:
    """The layout of `docker save` before Docker 25: <id>/layer.tar, <config-hex>.json."""
    built = build_builtin()
    config_name = f"{_hex(built.config_digest)}.json"
    layer_id = "ab" * 32
    entry = {
        "Config": config_name,
        "RepoTags": ["busybox:classic"],
        "Layers": [f"{layer_id}/layer.tar"],
    }
    return _tar_files(
        tmp_path / "classic.tar",
        {
            "manifest.json": json.dumps([entry]).encode(),
            config_name: built.config,
            f"{_hex(built.layer_digest)}.tar": layer if layer is not None else built.layer,
            f"{layer_id}/VERSION": b"1.0",
        },
        # Docker links repeated layers to their first copy this way.
        links={f"{layer_id}/layer.tar": f"../{_hex(built.layer_digest)}.tar"},
    )


def test_classic_docker_save(store: ImageStore, tmp_path: Path) -> None:
    import_image(store, "classic", _classic_save(tmp_path))
    _assert_builtin(store, "classic")


def test_truncated_archive_refused(store: ImageStore, tmp_path: Path) -> None:
    archive = _classic_save(tmp_path)
    data = archive.read_bytes()
    with tarfile.open(archive) as tar:
        last_header = tar.getmembers()[-1].offset
    # Mid-layer, and just before the link that names the layer.
    for cut in (len(data) // 2, last_header):
        with pytest.raises(ImageError):
            import_image(store, "cut", io.BytesIO(data[:cut]))
    assert store.lookup("cut") is None


def test_tampered_docker_save_layer_refused(store: ImageStore, tmp_path: Path) -> None:
    layer = bytearray(build_builtin().layer)
    layer[-5000] ^= 0x01
    with pytest.raises(ImageError, match="tampered"):
        import_image(store, "evil", _classic_save(tmp_path, layer=bytes(layer)))
    assert store.lookup("evil") is None


def test_tampered_docker_save_config_refused(store: ImageStore, tmp_path: Path) -> None:
    built = build_builtin()
    name = f"{_hex(built.config_digest)}.json"
    archive = _tar_files(
        tmp_path / "evil.tar",
        {
            "manifest.json": json.dumps([{"Config": name, "Layers": ["l.tar"]}]).encode(),
            name: built.config.replace(b'"sh"', b'"ls"'),
            "l.tar": built.layer,
        },
    )
    with pytest.raises(ImageError, match="tampered"):
        import_image(store, "evil", archive)


def test_new_docker_save_uses_oci_index(store: ImageStore, layout: Path, tmp_path: Path) -> None:
    """Docker 25+ writes an OCI layout plus a manifest.json that points into blobs/."""
    built = build_builtin()
    entry = {
        "Config": f"blobs/sha256/{_hex(built.config_digest)}",
        "RepoTags": ["busybox:new"],
        "Layers": [f"blobs/sha256/{_hex(built.layer_digest)}"],
    }
    (layout / "manifest.json").write_text(json.dumps([entry]))
    image = import_image(store, "new", _tar_dir(layout, tmp_path / "new.tar"))
    assert image.manifest_digest == built.manifest_digest
    # Without oci-layout the same archive is read through manifest.json.
    (layout / "oci-layout").unlink()
    other = import_image(store, "new2", _tar_dir(layout, tmp_path / "new2.tar"))
    assert other.layers == image.layers and other.config_digest == image.config_digest


def test_docker_save_with_compressed_named_layers(store: ImageStore, tmp_path: Path) -> None:
    built = build_builtin()
    layer = gzipped(built.layer)
    config_name = f"blobs/sha256/{_hex(built.config_digest)}"
    layer_name = f"blobs/sha256/{_hex(digest(layer))}"
    entry = {"Config": config_name, "Layers": [layer_name]}
    archive = _tar_files(
        tmp_path / "gz.tar",
        {
            "manifest.json": json.dumps([entry]).encode(),
            config_name: built.config,
            layer_name: layer,
        },
    )
    image = import_image(store, "gz", archive)
    assert image.layers == (digest(layer),)
    manifest = json.loads(store.blob_path(image.manifest_digest).read_bytes())
    assert manifest["layers"][0]["mediaType"].endswith("tar+gzip")


def test_archive_with_several_images_picks_the_tag(store: ImageStore, tmp_path: Path) -> None:
    built = build_builtin()
    name = f"{_hex(built.config_digest)}.json"
    entries = [
        {"Config": name, "RepoTags": ["other:1"], "Layers": ["missing.tar"]},
        {"Config": name, "RepoTags": ["docker.io/library/wanted:2"], "Layers": ["l.tar"]},
    ]
    files = {
        "manifest.json": json.dumps(entries).encode(),
        name: built.config,
        "l.tar": built.layer,
    }
    archive = _tar_files(tmp_path / "two.tar", files)
    import_image(store, "wanted:2", archive)
    _assert_builtin(store, "wanted:2")
    with pytest.raises(ImageError, match="none is tagged"):
        import_image(store, "third", archive)


# -- bad input -------------------------------------------------------------------------


def test_bad_sources(store: ImageStore, tmp_path: Path, layout: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        import_image(store, "x", tmp_path / "missing.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="neither a docker save archive nor an OCI"):
        import_image(store, "x", tmp_path / "empty")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"junk" * 1000)
    with pytest.raises(ImageError, match="not a readable tar"):
        import_image(store, "x", junk)
    compressed = tmp_path / "layout.tar.gz"
    compressed.write_bytes(gzipped(_tar_dir(layout, tmp_path / "l.tar").read_bytes()))
    with pytest.raises(ImageError, match="compressed"):
        import_image(store, "x", compressed)
    with pytest.raises(ImageError, match="no image data"):
        import_image(store, "x", io.BytesIO(b""))
    with pytest.raises(ImageError, match="invalid image reference"):
        import_image(store, "Bad Tag", layout)
    bad = _tar_files(tmp_path / "bad.tar", {"manifest.json": b'{"not": "a list"}'})
    with pytest.raises(ImageError, match=r"manifest\.json is malformed"):
        import_image(store, "x", bad)
    escape = _tar_files(
        tmp_path / "escape.tar",
        {"manifest.json": json.dumps([{"Config": "../../etc/passwd", "Layers": []}]).encode()},
    )
    with pytest.raises(ImageError, match=r"'\.\.'"):
        import_image(store, "x", escape)
    assert store.list() == []


# -- the real python:3.12-alpine -----------------------------------------------------------


@needs_python_image
@requires_root
def test_python_alpine_layout(store: ImageStore) -> None:
    image = import_image(store, "python:3.12-alpine", PYTHON_LAYOUT)
    assert image.manifest_digest == PYTHON_MANIFEST and len(image.layers) == 5
    config = store.config(image)
    assert (config.user, config.working_dir, config.cmd) == ("appuser", "/app", ("python3",))
    assert any(e.startswith("PYTHON_VERSION=3.12") for e in config.env)

    started = time.monotonic()
    ext4 = store.rootfs(image)
    print(f"python:3.12-alpine rootfs built in {time.monotonic() - started:.2f}s")
    python = debugfs_stat(ext4, "/usr/local/bin/python3.12")
    assert (python["Type"], int(python["Mode"], 8), python["User"]) == ("regular", 0o755, "0")
    app = debugfs_stat(ext4, "/app")
    assert (app["Type"], app["User"], app["Group"]) == ("directory", "1000", "1000")
    shadow = debugfs_stat(ext4, "/etc/shadow")
    assert (int(shadow["Mode"], 8), shadow["Group"]) == (0o640, "42")
    assert 'Fast link dest: "/bin/busybox"' in debugfs(ext4, "stat /bin/sh")
    assert "appuser" in debugfs(ext4, "cat /etc/passwd")


@needs_python_image
@needs_skopeo
def test_python_alpine_as_docker_archive(store: ImageStore, tmp_path: Path) -> None:
    archive = tmp_path / "python.tar"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "-q",
            f"oci:{PYTHON_LAYOUT}:python-basic",
            f"docker-archive:{archive}:python:3.12-alpine",
        ],
        check=True,
    )
    image = import_image(store, "python:3.12-alpine", archive)
    config = json.loads(store.blob_path(image.config_digest).read_bytes())
    # Docker archives hold uncompressed layers, so their digests are the config's diff_ids.
    assert list(image.layers) == config["rootfs"]["diff_ids"]
    assert store.config(image).user == "appuser"


@needs_python_image
def test_python_alpine_tampered_copy_refused(store: ImageStore, tmp_path: Path) -> None:
    copy = tmp_path / "python"
    shutil.copytree(PYTHON_LAYOUT, copy)
    _corrupt(copy / "blobs/sha256/d9dcf90b1211120648a1e2a2a6b6a3f66f5727b67f15c759b6c547a949b5ea47")
    with pytest.raises(ImageError, match="tampered"):
        import_image(store, "python:evil", copy)
    assert store.lookup("python:evil") is None
