"""The built-in busybox image: deterministic, complete, and importable."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from matchlock.errors import SetupMissing
from matchlock.image.builtin import BUILTIN_TAG, build_builtin, ensure_builtin, write_oci_layout
from matchlock.image.store import ImageStore


def test_deterministic() -> None:
    first, second = build_builtin(), build_builtin()
    assert first == second
    assert first.manifest_digest == second.manifest_digest


def test_layer_contents() -> None:
    built = build_builtin()
    with tarfile.open(fileobj=io.BytesIO(built.layer)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        names = [m.name for m in tar.getmembers()]
        passwd = tar.extractfile("etc/passwd")
        assert passwd is not None
        users = passwd.read().decode()
    assert names == sorted(names, key=lambda n: n.split("/"))
    assert all(m.mtime == 0 and m.uname == "" for m in members.values())
    assert members["bin/busybox"].mode == 0o755 and members["bin/busybox"].isreg()
    assert members["tmp"].mode == 0o1777 and members["root"].mode == 0o700
    assert (members["home/user"].uid, members["home/user"].gid) == (1000, 1000)
    applets = subprocess.run(
        ["/bin/busybox", "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet != "bin/busybox":
            assert members[applet].issym() and members[applet].linkname == "/bin/busybox"
    assert {line.split(":")[0] for line in users.splitlines()} == {"root", "nobody", "user"}
    assert "user:x:1000:1000:user:/home/user:/bin/sh" in users


def test_config() -> None:
    config = json.loads(build_builtin().config)
    assert config["config"] == {
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": ["sh"],
    }
    assert config["os"] == "linux" and config["rootfs"]["diff_ids"] == [
        build_builtin().layer_digest
    ]


def test_oci_layout(tmp_path: Path) -> None:
    digest = write_oci_layout(tmp_path / "layout")
    index = json.loads((tmp_path / "layout/index.json").read_bytes())
    (entry,) = index["manifests"]
    assert entry["digest"] == digest
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "busybox"
    assert json.loads((tmp_path / "layout/oci-layout").read_bytes()) == {
        "imageLayoutVersion": "1.0.0"
    }
    blobs = sorted(p.name for p in (tmp_path / "layout/blobs/sha256").iterdir())
    assert len(blobs) == 3 and digest.split(":")[1] in blobs


def test_ensure_builtin_is_idempotent(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    first = ensure_builtin(store)
    assert first.name == BUILTIN_TAG
    assert ensure_builtin(store) == first
    assert [i.name for i in store.list()] == [BUILTIN_TAG]


def test_dynamic_busybox_refused(tmp_path: Path) -> None:
    with pytest.raises(SetupMissing, match="not found"):
        build_builtin(tmp_path / "nope")
    with pytest.raises(SetupMissing, match="not a static executable"):
        build_builtin(Path("/bin/ls"))  # dynamically linked on Debian
