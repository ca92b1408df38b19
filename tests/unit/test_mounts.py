"""sandbox.mounts: `-v` parsing, the SETUP field, and the host-side exports (no VM)."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from matchlock.errors import MatchlockError
from matchlock.sandbox import mounts


def test_parse_modes_defaults_and_relative_host_paths(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("x")
    monkeypatch.chdir(tmp_path)
    specs = mounts.parse_mounts(["d:/workspace/a", f"{tmp_path}/f:/workspace/b:RO",
                                 "d:/workspace/c:readonly", "d:/workspace/d/:host_fs"], None)
    assert [(s.host, s.guest, s.mode) for s in specs] == [
        (tmp_path / "d", "/workspace/a", "overlay"), (tmp_path / "f", "/workspace/b", "ro"),
        (tmp_path / "d", "/workspace/c", "ro"), (tmp_path / "d", "/workspace/d", "host_fs"),
    ]


@pytest.mark.parametrize(("volumes", "workspace", "needle"), [
    (["x"], None, "invalid -v"),
    (["{d}:/workspace/a:bogus"], None, "unknown option 'bogus'"),
    (["{d}:rel"], None, "not an absolute guest path"),
    (["{d}:/workspace/a/../b"], None, "contains '..'"),
    (["{d}:/elsewhere"], None, "not within the workspace"),
    (["{d}:/proc/x"], "/proc", "inside /proc"),
    (["{d}:/dev"], "/dev", "inside /dev"),
    (["{d}:/"], "/", "guest's root"),
    ([], "/w", "needs at least one -v"),
    (["{d}:/workspace/a", "{d}:/workspace/a/b"], None, "nested"),
    (["{d}:/workspace/a", "{d}:/workspace/a"], None, "same guest path"),
    (["{d}/missing:/workspace/a"], None, "does not exist"),
    ([f"{{d}}:/workspace/m{i}" for i in range(17)], None, "at most 16"),
])
def test_parse_errors(tmp_path: Path, volumes: list[str], workspace: str | None,
                      needle: str) -> None:
    with pytest.raises(MatchlockError) as e:
        mounts.parse_mounts([v.format(d=tmp_path) for v in volumes], workspace)
    assert needle in str(e.value)


def test_setup_field_layout(tmp_path: Path) -> None:
    spec = mounts.MountSpec(tmp_path, "/workspace/x", "host_fs")
    assert mounts.setup_field(1, 3, spec, mounts.KIND_FILE) == (
        struct.pack(">BBBB", 1, 2, 1, 3) + b"/workspace/x")


@pytest.mark.skipif(os.geteuid() != 0, reason="detached idmapped mounts need root")
def test_exports_are_detached_idmapped_and_read_only_where_asked(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "a").write_text("A")
    f = tmp_path / "f"
    f.write_text("F")
    specs = (mounts.MountSpec(d, "/workspace/ro", "ro"),
             mounts.MountSpec(f, "/workspace/f", "overlay"),
             mounts.MountSpec(d, "/workspace/rw", "host_fs"))
    before = Path("/proc/self/mountinfo").read_text()
    vmm = (1_900_065_000, 1_900_065_000)
    shares = mounts.prepare(specs, vmm)
    try:
        ro, rw = (Path(f"/proc/self/fd/{fd}") for fd in shares.fds)
        assert sorted(os.listdir(ro)) == ["0", "1"] and os.listdir(rw) == ["2"]
        assert (ro / "0" / "a").read_text() == "A" and (ro / "1").read_text() == "F"
        # the owner's files appear as the VMM's
        assert os.stat(ro / "0" / "a").st_uid == vmm[0]
        for path in (ro / "0" / "new", ro / "1", ro / "x", rw / "x"):
            with pytest.raises(OSError) as e:
                path.write_text("no")
            assert e.value.errno == errno.EROFS
        with pytest.raises(OSError) as e:  # only the VMM's ids are mapped, not root's
            (rw / "2" / "root").write_text("no")
        assert e.value.errno == errno.EOVERFLOW
        pid = os.fork()
        if pid == 0:  # as the VMM
            try:
                os.setgroups([])
                os.setgid(vmm[1])
                os.setuid(vmm[0])
                (rw / "2" / "new").write_text("yes")
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert (d / "new").read_text() == "yes"
        st = os.stat(d / "new")
        assert (st.st_uid, st.st_gid) == mounts.owner_ids()
        assert shares.setup_fields[2][:4] == struct.pack(">BBBB", 1, 2, 0, 2)
        assert "/proc/self/fd/" in " ".join(shares.qemu_args)
        assert Path("/proc/self/mountinfo").read_text() == before  # in no namespace
    finally:
        shares.close()
    assert shares.fds == []
