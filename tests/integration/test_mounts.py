"""`run -v HOST:GUEST[:ro|overlay|host_fs]`: host folders and files in real microVMs.

The guest is hostile: besides the modes themselves, these tests try to reach host paths
outside the mounted folder, to write through `ro` and `overlay`, and to leave host files owned
by someone other than the invoking user."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm
Run = Callable[..., subprocess.CompletedProcess[bytes]]


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under root: type, mode, owner and content (or link target)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath, name)
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                what = "link:" + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                what = "dir"
            out[str(p.relative_to(root))] = f"{oct(st.st_mode)} {st.st_uid}:{st.st_gid} {what}"
    return out


def mount_count() -> int:
    return len(Path("/proc/self/mountinfo").read_text().splitlines())


@pytest.fixture
def host(tmp_path: Path) -> Path:
    d = tmp_path / "proj"
    d.mkdir()
    (d / "hello.txt").write_text("hello from the host\n")
    (d / "sub").mkdir()
    (d / "sub" / "data.bin").write_bytes(bytes(range(256)) * 16)
    (d / "script.sh").write_text("#!/bin/sh\necho script ran\n")
    (d / "script.sh").chmod(0o755)
    return d


def sh(ml: Run, *args: str, script: str, check: bool = True,
       **kw: object) -> subprocess.CompletedProcess[bytes]:
    r = ml("run", *args, "--", "sh", "-c", script, **kw)
    if check:
        assert r.returncode == 0, (r.stdout, r.stderr)
    return r


def test_read_a_host_folder_and_file_in_every_mode(ml: Run, host: Path, tmp_path: Path) -> None:
    single = tmp_path / "single.cfg"
    single.write_text("one file\n")
    before = mount_count()
    r = sh(ml, "-v", f"{host}:/workspace/a", "-v", f"{host}:/workspace/b:ro",
           "-v", f"{host}:/workspace/c:host_fs", "-v", f"{single}:/workspace/one.cfg:ro",
           script="for m in a b c; do cat /workspace/$m/hello.txt; "
                  "sha256sum /workspace/$m/sub/data.bin | cut -d' ' -f1; "
                  "/workspace/$m/script.sh; done; cat /workspace/one.cfg")
    digest = hashlib.sha256(bytes(range(256)) * 16).hexdigest()
    expected = ["hello from the host", digest, "script ran"] * 3 + ["one file"]
    assert r.stdout.decode().splitlines() == expected
    assert mount_count() == before  # nothing was ever mounted in the host's namespace


def test_host_fs_writes_reach_the_host_owned_by_the_invoking_user(ml: Run, host: Path) -> None:
    sh(ml, "-v", f"{host}:/workspace/p:host_fs",
       script="cd /workspace/p && echo new > new.txt && mkdir -p made/deep && "
              "echo deep > made/deep/f && chmod 600 made/deep/f && echo more >> hello.txt && "
              "rm script.sh && mv sub/data.bin sub/moved.bin && ln -s hello.txt link")
    assert (host / "new.txt").read_text() == "new\n"
    assert (host / "made/deep/f").read_text() == "deep\n"
    assert stat.S_IMODE((host / "made/deep/f").stat().st_mode) == 0o600
    assert (host / "hello.txt").read_text() == "hello from the host\nmore\n"
    assert not (host / "script.sh").exists()
    assert (host / "sub/moved.bin").exists() and not (host / "sub/data.bin").exists()
    assert os.readlink(host / "link") == "hello.txt"
    for p in (host / "new.txt", host / "made", host / "made/deep/f", host / "link"):
        st = p.lstat()
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid()), p


def test_under_sudo_new_files_belong_to_the_sudo_user(ml: Run, host: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    uid = gid = 4321
    os.chown(host, uid, gid)
    monkeypatch.setenv("SUDO_UID", str(uid))
    monkeypatch.setenv("SUDO_GID", str(gid))
    r = sh(ml, "-v", f"{host}:/workspace/p:host_fs", check=False,
           script="echo mine > /workspace/p/mine.txt; "
                  "echo x >> /workspace/p/hello.txt || echo refused")
    assert r.returncode == 0, r.stderr
    st = (host / "mine.txt").stat()
    assert (st.st_uid, st.st_gid) == (uid, gid)
    # hello.txt is root's and 0644: the sudo user may not write it, so neither may the guest
    assert b"refused" in r.stdout
    assert (host / "hello.txt").read_text() == "hello from the host\n"


def test_overlay_writes_stay_in_the_guest(ml: Run, host: Path, tmp_path: Path) -> None:
    single = tmp_path / "single.cfg"
    single.write_text("original\n")
    before, single_before = tree_digest(host), single.read_bytes()
    r = sh(ml, "-v", f"{host}:/workspace/o", "-v", f"{single}:/workspace/s.cfg:overlay",
           script="cd /workspace/o && echo guest > new.txt && echo changed > hello.txt && "
                  "rm sub/data.bin && mkdir d && chmod 700 sub && ln -s x l && "
                  "echo edited > /workspace/s.cfg && cat hello.txt new.txt /workspace/s.cfg "
                  "&& ls sub | wc -l")
    assert r.stdout.decode().split() == ["changed", "guest", "edited", "0"]
    assert tree_digest(host) == before
    assert single.read_bytes() == single_before


def test_ro_refuses_every_write_even_to_a_privileged_remount(ml: Run, host: Path,
                                                             tmp_path: Path) -> None:
    single = tmp_path / "single.cfg"
    single.write_text("read me\n")
    before = tree_digest(host)
    attempts = ("echo x > /workspace/r/new; echo x >> /workspace/r/hello.txt; "
                "rm /workspace/r/hello.txt; mkdir /workspace/r/d; chmod 777 /workspace/r/sub; "
                "touch /workspace/r/hello.txt; mv /workspace/r/hello.txt /workspace/r/h2; "
                "ln -s / /workspace/r/l; mknod /workspace/r/n c 1 3; "
                "echo x > /workspace/f.cfg; ")
    r = sh(ml, "-v", f"{host}:/workspace/r:ro", "-v", f"{single}:/workspace/f.cfg:ro",
           check=False,
           script=attempts + "mount -o remount,rw /workspace/r && echo REMOUNTED; "
                  "umount /workspace/r && echo UNMOUNTED; cat /workspace/r/hello.txt")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "REMOUNTED" not in out and "UNMOUNTED" not in out  # no CAP_SYS_ADMIN in an exec
    assert out.strip() == "hello from the host"
    # A privileged exec can remount the guest's mounts read-write, or mount the share
    # itself, yet the VMM and the host kernel still refuse.
    r = sh(ml, "--privileged", "-v", f"{host}:/workspace/r:ro",
           "-v", f"{single}:/workspace/f.cfg:ro", check=False,
           script="mount -o remount,rw /workspace/r; mount -o remount,rw /workspace/f.cfg; "
                  "mkdir -p /mnt/raw; if mount -t 9p -o trans=virtio,version=9p2000.L ml0 "
                  "/mnt/raw; then ls /mnt/raw; echo y > /mnt/raw/0/new; echo y > /mnt/raw/x; "
                  "echo y >> /mnt/raw/1; else echo raw-mount-refused; fi; " + attempts + "true")
    assert r.returncode == 0, r.stderr
    # The share is busy (the agent's mount holds its only channel); were it not, it would
    # hold the two mounts and nothing else.
    assert r.stdout.decode().split() in (["raw-mount-refused"], ["0", "1"])
    assert tree_digest(host) == before
    assert single.read_text() == "read me\n"


def test_the_guest_cannot_reach_host_paths_outside_the_folder(ml: Run, host: Path,
                                                              tmp_path: Path) -> None:
    secret = tmp_path / "outside-secret.txt"
    secret.write_text("host secret 3f1c\n")
    os.symlink(str(secret), host / "host-made-link")  # planted on the host side
    os.symlink("../outside-secret.txt", host / "host-made-rel-link")
    os.mkfifo(host / "fifo")
    before_outside = sorted(p.name for p in tmp_path.iterdir())
    script = (
        # symlinks are resolved by the guest, in the guest: never on the host
        "cat /workspace/p/host-made-link /workspace/p/host-made-rel-link 2>&1; "
        "ln -s /etc /workspace/p/etc-link && echo pwned > /workspace/p/etc-link/pwned-by-guest; "
        "ln -s ../../../../../../ /workspace/p/up && ls /workspace/p/up/ | head -50; "
        "ln -s /workspace/p/../../../../outside-secret.txt /workspace/p/dd; "
        "cat /workspace/p/dd 2>&1; "
        "cat /workspace/p/../../outside-secret.txt 2>&1; "
        "ls -a /workspace/p/.. /workspace/p/sub/../.. 2>&1; "
        # hard links, device nodes, a mount over the share
        "ln /etc/passwd /workspace/p/hard 2>&1 || echo no-hard-link; "
        "mknod /workspace/p/mem c 1 1 2>&1 || echo no-mknod; "
        "mkdir -p /mnt/raw; if mount -t 9p -o trans=virtio,version=9p2000.L ml1 /mnt/raw; "
        "then ls -a /mnt/raw /mnt/raw/.. /mnt/raw/0/.. /mnt/raw/0/../.. 2>&1; "
        "echo x > /mnt/raw/new-at-share-root 2>&1 || echo share-root-read-only; "
        "else echo raw-mount-refused; fi; "
        "umount /workspace/p && ls -a /workspace/p; "  # the bind goes, the share stays hidden
        "timeout 2 cat /workspace/p/fifo 2>&1; true"
    )
    r = sh(ml, "--privileged", "--hostname", "guestbox", "-v", f"{host}:/workspace/p:host_fs",
           script=script, check=False, timeout=240)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "host secret" not in out
    assert "share-root-read-only" in out or "raw-mount-refused" in out
    # what the guest's symlink to /etc did, it did to the guest's own /etc
    assert not Path("/etc/pwned-by-guest").exists()
    assert os.readlink(host / "etc-link") == "/etc"
    assert not (host / "hard").exists() and not (host / "mem").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before_outside
    assert secret.read_text() == "host secret 3f1c\n"


def test_many_mounts_and_a_custom_workspace(ml: Run, tmp_path: Path) -> None:
    dirs = []
    for i in range(6):
        d = tmp_path / f"d{i}"
        d.mkdir()
        (d / "id").write_text(f"{i}\n")
        dirs.append(d)
    modes = ["ro", "overlay", "host_fs", "ro", "overlay", "host_fs"]
    args: list[str] = ["--workspace", "/srv/work"]
    for i, (d, m) in enumerate(zip(dirs, modes, strict=True)):
        args += ["-v", f"{d}:/srv/work/m{i}:{m}"]
    r = sh(ml, *args, script="for i in 0 1 2 3 4 5; do cat /srv/work/m$i/id; "
                             "echo w > /srv/work/m$i/w 2>/dev/null && echo w$i; done")
    assert r.stdout.decode().split() == ["0", "1", "w1", "2", "w2", "3", "4", "w4", "5", "w5"]
    assert [(d / "w").exists() for d in dirs] == [False, False, True, False, False, True]


def test_a_symlink_in_the_image_never_redirects_a_mount(ml: Run, host: Path) -> None:
    # /linuxrc is a symlink in the busybox image (-> bin/busybox): a mount point under it is
    # refused by the agent, not created wherever the link points.
    r = ml("run", "--workspace", "/linuxrc", "-v", f"{host}:/linuxrc/x:ro", "--", "true")
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "mount point /linuxrc/x: linuxrc is not a directory" in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(("args", "needle"), [
    (["-v", "nocolon"], "invalid -v 'nocolon'"),
    (["-v", "a:b:c:d"], "invalid -v 'a:b:c:d'"),
    (["-v", ":/workspace/x"], "invalid -v"),
    (["-v", "{host}:/workspace/x:rw"], "unknown option 'rw'"),
    (["-v", "/nonexistent/matchlock-test:/workspace/x"], "does not exist"),
    (["-v", "{host}:workspace/x"], "not an absolute guest path"),
    (["-v", "{host}:/workspace/../etc"], "contains '..'"),
    (["-v", "{host}:/etc/x"], "not within the workspace /workspace"),
    (["--workspace", "/proc", "-v", "{host}:/proc/x"], "inside /proc"),
    (["--workspace", "/", "-v", "{host}:/x"], "guest's root"),
    (["--workspace", "/sys/fs", "-v", "{host}:/sys/fs/x"], "inside /sys"),
    (["--workspace", "/w"], "--workspace needs at least one -v"),
    (["-v", "{host}:/workspace/a", "-v", "{host}:/workspace/a:ro"], "same guest path"),
    (["-v", "{host}:/workspace/a", "-v", "{host}:/workspace/a/b"], "nested"),
    (["-v", "/dev/null:/workspace/n"], "neither a directory nor a regular file"),
    (["-v", "{host}:/workspace/a b"], "characters other than"),
])
def test_bad_input_is_one_line_and_creates_nothing(ml: Run, host: Path, state_dir: Path,
                                                   args: list[str], needle: str) -> None:
    before = tree_digest(host)
    r = ml("run", *[a.format(host=host) for a in args], "--", "true")
    assert r.returncode == 1
    err = r.stderr.decode()
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert tree_digest(host) == before
    assert not (state_dir / "sandboxes").exists() or not any((state_dir / "sandboxes").iterdir())
