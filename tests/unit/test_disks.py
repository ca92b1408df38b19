"""`--disk` parsing, volume names and what QEMU and the agent are told (no VM)."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from matchlock.errors import MatchlockError
from matchlock.sandbox import disks, volumes
from matchlock.sandbox.mounts import MountSpec


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MATCHLOCK_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img), "4M"], check=True)
    return img


def error(fn: object, *args: object) -> str:
    with pytest.raises(MatchlockError) as e:
        fn(*args)  # type: ignore[operator]
    return str(e.value)


def test_host_file_specs(image: Path, tmp_path: Path) -> None:
    d = disks.parse_disk(f"{image}:/data")
    assert (d.path, d.guest, d.readonly, d.volume) == (image, "/data", False, None)
    assert disks.parse_disk(f"{image}:/data/./x/:ro").guest == "/data/x"
    assert disks.parse_disk(f"{image}:/d:readonly").readonly
    assert not disks.parse_disk(f"{image}:/d:RW").readonly
    rel = disks.parse_disk("disk.img:/d", cwd=str(tmp_path))
    assert rel.path == image


def test_volume_specs(home: Path) -> None:
    volumes.create("data", 16)
    d = disks.parse_disk("@data:/mnt/data:ro")
    assert d.volume == "data" and d.readonly
    assert d.path == home / "state" / "volumes" / "data.ext4"
    assert "named volume not found: other" in error(disks.parse_disk, "@other:/x")


@pytest.mark.parametrize(("spec", "words"), [
    ("x", "invalid --disk"),
    (":/x", "invalid --disk"),
    ("@data:", "invalid --disk"),
    ("a:b:c:d", "invalid --disk"),
    ("@data:/x:rx", "unknown option 'rx'"),
    ("@data:x", "not an absolute guest path"),
    ("@data:/", "guest's root"),
    ("@data:/a/../b", "'..'"),
    ("@data:/dev/x", "/dev"),
    ("@data:/sys", "/sys"),
    ("@data:/a b", "characters"),
    ("@../data:/x", "invalid volume name"),
    ("@/etc/passwd:/x", "invalid volume name"),
    ("@.data:/x", "invalid volume name"),
    ("/nonexistent/file.img:/x", "does not exist"),
])
def test_bad_specs(home: Path, spec: str, words: str) -> None:
    volumes.create("data", 16)
    assert words in error(disks.parse_disk, spec)


def test_a_directory_is_refused(tmp_path: Path) -> None:
    assert "not a regular file" in error(disks.parse_disk, f"{tmp_path}:/x")


def test_sets_of_disks(image: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(image.read_bytes())
    assert len(disks.parse_disks([f"{image}:/a", f"{other}:/b"])) == 2
    assert "same file" in error(disks.parse_disks, [f"{image}:/a", f"{image}:/b:ro"])
    link = tmp_path / "link.img"
    os.link(image, link)
    assert "same file" in error(disks.parse_disks, [f"{image}:/a", f"{link}:/b"])
    assert "same guest path" in error(disks.parse_disks, [f"{image}:/a", f"{other}:/a"])
    assert "nested" in error(disks.parse_disks, [f"{image}:/a", f"{other}:/a/b"])
    mount = MountSpec(host=tmp_path, guest="/workspace", mode="ro", spec="x:/workspace")
    assert "nested" in error(disks.parse_disks, [f"{image}:/workspace/d"], [mount])
    assert "same guest path" in error(disks.parse_disks, [f"{image}:/workspace"], [mount])
    assert "room for 1" in error(disks.parse_disks, [f"{image}:/a", f"{other}:/b"], (), 1)


def test_free_slots() -> None:
    assert disks.free_slots(network=False, mounts=False) == 5
    assert disks.free_slots(network=True, mounts=True) == 2


def test_template_shape_and_device_arguments(image: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(image.read_bytes())
    specs = disks.parse_disks([f"{image}:/a", f"{other}:/b:ro"])
    assert disks.devices_key(specs) == "+volwr"
    assert disks.devices_key(()) == ""
    args = disks.Disks(specs).qemu_args()
    size = 1 << 40
    assert args == [
        "-blockdev", f"driver=null-co,node-name=mlph0,size={size},read-zeroes=on",
        "-blockdev", "driver=raw,node-name=mlvol0,file=mlph0",
        "-device", "virtio-blk-device,drive=mlvol0,serial=mlvol0,werror=report,rerror=report",
        "-blockdev", f"driver=null-co,node-name=mlph1,size={size},read-zeroes=on,read-only=on",
        "-blockdev", "driver=raw,node-name=mlvol1,file=mlph1,read-only=on",
        "-device", "virtio-blk-device,drive=mlvol1,serial=mlvol1,werror=report,rerror=report",
    ]
    # No host path reaches QEMU's command line: the files are handed over as descriptors.
    assert not any(str(tmp_path) in a for a in args)


def test_setup_field_layout(image: Path) -> None:
    d = disks.parse_disk(f"{image}:/data/x:ro")
    assert disks.setup_field(3, d) == struct.pack(">BB", 3, 1) + b"/data/x"
    assert disks.setup_field(0, disks.parse_disk(f"{image}:/d")) == b"\x00\x00/d"


def test_open_locks_one_writer_or_many_readers(image: Path, tmp_path: Path) -> None:
    rw = disks.parse_disks([f"{image}:/a"])
    ro = disks.parse_disks([f"{image}:/a:ro"])
    a = disks.open_disks(ro)
    b = disks.open_disks(ro)
    assert "in use" in error(disks.open_disks, rw)
    a.close()
    b.close()
    w = disks.open_disks(rw)
    assert "in use" in error(disks.open_disks, ro)
    assert "in use" in error(disks.open_disks, rw)
    assert os.get_inheritable(w.fds[0]) is False
    w.close()
    disks.open_disks(rw).close()


def test_open_refuses_what_is_not_ext4(tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\0" * (2 << 20))
    assert "not an ext4 image" in error(disks.open_disks, disks.parse_disks([f"{junk}:/a"]))
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(b"\0" * 4096)
    assert "1 MiB" in error(disks.open_disks, disks.parse_disks([f"{tiny}:/a"]))


def test_volume_names() -> None:
    for ok in ("a", "data", "A1_b.c-d", "x" * 128, " padded "):
        assert volumes.check_name(ok) == ok.strip()
    for bad in ("", " ", ".a", "-a", "_a", "a/b", "../a", "a\0b", "a:b", "x" * 129, "a\nb"):
        with pytest.raises(MatchlockError):
            volumes.check_name(bad)


def test_volume_json_shape(tmp_path: Path) -> None:
    v = volumes.VolumeInfo("n", 16 << 20, tmp_path / "n.ext4")
    assert v.as_json() == {"name": "n", "size": "16.0 MB", "path": str(tmp_path / "n.ext4")}
    assert volumes.VolumeInfo("n", 1536 * 1024, tmp_path).size == "1.5 MB"


def test_create_failure_leaves_nothing(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(volumes, "_mkfs", lambda: "/bin/false")
    assert "mkfs.ext4 failed" in error(volumes.create, "x", 16)
    assert os.listdir(home / "state" / "volumes") == []


def fake_stat(mode: int, uid: int = 1000, gid: int = 1000) -> os.stat_result:
    return os.stat_result((0o100000 | mode, 1, 1, 1, uid, gid, 4096, 0, 0, 0))


def test_host_files_need_the_invoking_users_rights() -> None:
    owner, stranger, group_member = (1000, 1000), (2000, 2000), (2000, 1000)
    assert disks.user_may(fake_stat(0o600), write=True, ids=owner)
    assert not disks.user_may(fake_stat(0o600), write=False, ids=stranger)
    assert disks.user_may(fake_stat(0o000), write=True, ids=(0, 0))
    assert disks.user_may(fake_stat(0o644), write=False, ids=stranger)
    assert not disks.user_may(fake_stat(0o644), write=True, ids=stranger)
    assert not disks.user_may(fake_stat(0o464), write=True, ids=owner)  # owner bits decide
    assert disks.user_may(fake_stat(0o464), write=True, ids=group_member)
    assert not disks.user_may(fake_stat(0o646), write=True, ids=group_member)


def test_sudo_user_without_access_is_refused(image: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (matchlock under sudo)")
    os.chmod(image, 0o600)
    monkeypatch.setenv("SUDO_UID", "4242")
    monkeypatch.setenv("SUDO_GID", "4242")
    assert "you may not read" in error(disks.open_disks, disks.parse_disks([f"{image}:/a:ro"]))
    os.chmod(image, 0o644)
    assert "you may not write" in error(disks.open_disks, disks.parse_disks([f"{image}:/a"]))
    disks.open_disks(disks.parse_disks([f"{image}:/a:ro"])).close()
