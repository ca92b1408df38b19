"""Snapshot templates without a VM: the migration stream travels as a descriptor over QMP,
and templates are private and tamper-evident."""

from __future__ import annotations

import json
import mmap
import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from matchlock.sandbox import template
from matchlock.vm import qemu
from matchlock.vm.qmp import Qmp

# --- descriptors over QMP --------------------------------------------------------------------


def test_getfd_carries_the_descriptor_with_the_command(tmp_path: Path) -> None:
    ours, qemu_end = socket.socketpair()
    got: dict[str, object] = {}

    def fake_qemu() -> None:
        f = qemu_end.makefile("rwb")
        f.write(b'{"QMP": {}}\n')
        f.flush()
        assert json.loads(f.readline())["execute"] == "qmp_capabilities"
        f.write(b'{"return": {}}\n')
        f.flush()
        msg, fds, _flags, _addr = socket.recv_fds(qemu_end, 4096, 4)
        got["msg"], got["fds"] = json.loads(msg), fds
        qemu_end.sendall(b'{"event": "SOMETHING"}\n{"return": {}}\n')

    t = threading.Thread(target=fake_qemu)
    t.start()
    data = tmp_path / "stream"
    data.write_bytes(b"migration")
    qmp = Qmp(ours, timeout=5)
    with open(data, "rb") as f:
        qmp.send_fd("matchlock-migration", f.fileno())
    t.join(5)
    assert got["msg"] == {"execute": "getfd", "arguments": {"fdname": "matchlock-migration"}}
    fds = got["fds"]
    assert isinstance(fds, list) and len(fds) == 1
    assert os.read(fds[0], 100) == b"migration"
    os.close(fds[0])
    qmp.close()
    qemu_end.close()


# --- templates -------------------------------------------------------------------------------


def _fake_template(key: str, cache: Path) -> template.Template:
    """What save() leaves, without a VM: private files and the RAM file's identity."""
    root = cache / "templates"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    t = template.Template(root / key)
    t.dir.mkdir(mode=0o700)
    for name in ("ram", "state"):
        os.close(os.open(t.dir / name, os.O_WRONLY | os.O_CREAT, 0o600))
    t.ram.write_bytes(b"\0" * 4096)
    (t.dir / "complete").write_text(template._identity(t))
    return t


def test_an_intact_private_template_is_found(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATCHLOCK_CACHE_DIR", str(tmp_path))
    t = _fake_template("k1", tmp_path)
    assert template.find("k1") == t
    assert stat.S_IMODE((tmp_path / "templates").stat().st_mode) == 0o700
    assert template.find("absent") is None


def test_a_template_written_to_after_saving_is_discarded(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATCHLOCK_CACHE_DIR", str(tmp_path))
    t = _fake_template("k2", tmp_path)
    with open(t.ram, "r+b") as f:  # as a compromised VMM could, through its descriptor
        f.write(b"\x90")
    assert template.find("k2") is None
    assert not t.dir.exists()


def test_a_template_readable_by_others_is_discarded(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATCHLOCK_CACHE_DIR", str(tmp_path))
    t = _fake_template("k3", tmp_path)
    os.chmod(t.dir, 0o755)
    assert template.find("k3") is None
    assert not t.dir.exists()


def test_a_template_of_the_old_format_is_discarded(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATCHLOCK_CACHE_DIR", str(tmp_path))
    t = _fake_template("k4", tmp_path)
    (t.dir / "complete").write_text("")
    assert template.find("k4") is None


def test_an_image_template_whose_layer_changed_is_discarded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATCHLOCK_CACHE_DIR", str(tmp_path))
    t = _fake_template("k5", tmp_path)
    t.upper.write_bytes(b"layer")
    (t.dir / "complete").write_text(template._identity(t))
    assert template.find("k5") == t
    with open(t.upper, "r+b") as f:  # the layer a clone copies must be the one the RAM mounted
        f.write(b"L")
    assert template.find("k5") is None
    assert not t.dir.exists()


def test_shared_ram_is_a_sparse_private_copy_of_the_template_ram(tmp_path: Path) -> None:
    # The RAM of a VM restored to be saved as an image template: the template's data, holes
    # left holes (no memory for pages the guest never touched), and nothing it writes reaches
    # the template every other clone maps.
    page = mmap.PAGESIZE
    size = 256 * page
    t = template.Template(tmp_path)
    with open(t.ram, "wb") as f:
        f.truncate(size)
        f.seek(3 * page)
        f.write(b"file" * 1024)
        f.seek(255 * page)
        f.write(b"last" * 1024)
    fd = template.shared_ram(t)
    try:
        assert os.fstat(fd).st_size == size
        assert os.pread(fd, size, 0) == t.ram.read_bytes()
        assert os.lseek(fd, 0, os.SEEK_DATA) == 3 * page
        assert os.lseek(fd, 3 * page, os.SEEK_HOLE) == 4 * page
        assert os.fstat(fd).st_blocks * 512 <= 2 * page
        m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        m[3 * page:3 * page + 5] = b"guest"
        m.close()
        assert t.ram.read_bytes()[3 * page:3 * page + 4] == b"file"
        assert os.get_inheritable(fd) is False
    finally:
        os.close(fd)


def test_image_templates_of_a_removed_or_replaced_rootfs_are_pruned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATCHLOCK_CACHE_DIR", str(tmp_path / "cache"))
    kept, gone, replaced = (tmp_path / n for n in ("kept.ext4", "gone.ext4", "replaced.ext4"))
    for f in (kept, gone, replaced):
        f.write_bytes(b"rootfs")
    ts = {}
    for name, f in (("a", kept), ("b", gone), ("c", replaced)):
        ts[name] = _fake_template(name, tmp_path / "cache")
        (ts[name].dir / "image").write_text(template._rootfs_identity(f))
    generic = _fake_template("g", tmp_path / "cache")  # not an image template: never pruned
    gone.unlink()
    replaced.unlink()
    replaced.write_bytes(b"pulled again")
    assert template.prune_images() == 2
    assert ts["a"].dir.exists() and generic.dir.exists()
    assert not ts["b"].dir.exists() and not ts["c"].dir.exists()


def test_a_template_is_tied_to_its_cpu_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # A snapshot resumes on the CPU model it was saved with: another model is another template.
    before = template.key("boot", "tcg", 1, 512, "d")
    monkeypatch.setattr(qemu, "accel_args", lambda accel: ["-accel", accel, "-cpu", "other"])
    assert template.key("boot", "tcg", 1, 512, "d") != before
