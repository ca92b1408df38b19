"""Named volumes and `run --disk`: ext4 disks whose data outlives the sandbox, in real VMs.

The guest is hostile: a read-only disk must stay unchanged even for a privileged guest that
tries to remount it, and one writer at a time holds a volume."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm
Run = Callable[..., subprocess.CompletedProcess[bytes]]


def one_line_error(r: subprocess.CompletedProcess[bytes], *words: str) -> None:
    assert r.returncode != 0, r.stdout
    err = r.stderr.decode()
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("matchlock: "), err
    for w in words:
        assert w in err, err


def sh(ml: Run, *flags: str, script: str) -> subprocess.CompletedProcess[bytes]:
    return ml("run", *flags, "--", "sh", "-c", script)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def volume_files(state_dir: Path) -> list[str]:
    d = state_dir / "volumes"
    return sorted(os.listdir(d)) if d.exists() else []


@pytest.fixture
def volume(ml: Run, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"t-{request.node.name[5:30]}"
    ml("volume", "create", name, "--size", "64", check=True)
    yield name
    ml("volume", "rm", name)


def test_volume_commands_and_the_sdk_json(ml: Run, state_dir: Path) -> None:
    r = ml("volume", "create", "cli-a", "--size", "16", "--json", check=True)
    assert r.stdout.decode().count("\n") == 1
    created = json.loads(r.stdout)
    path = state_dir / "volumes" / "cli-a.ext4"
    assert created == {"name": "cli-a", "size": "16.0 MB", "path": str(path)}
    assert list(created) == ["name", "size", "path"]
    assert path.stat().st_size == 16 << 20
    assert path.stat().st_blocks * 512 < 4 << 20  # sparse
    assert ml("volume", "create", "cli-b", check=True).stdout == \
        b"Created volume cli-b (10240 MB)\n"
    one_line_error(ml("volume", "create", "cli-a"), "already exists: cli-a")
    assert json.loads(ml("volume", "ls", "--json", check=True).stdout) == [
        created, {"name": "cli-b", "size": "10240.0 MB",
                  "path": str(state_dir / "volumes" / "cli-b.ext4")}]
    text = ml("volume", "list", check=True).stdout.decode().splitlines()
    assert text[0].split() == ["NAME", "SIZE"] and text[1].split() == ["cli-a", "16.0", "MB"]
    assert ml("volume", "copy", "cli-a", "cli-c", check=True).stdout == \
        b"Copied volume cli-a to cli-c\n"
    assert digest(state_dir / "volumes" / "cli-c.ext4") == digest(path)
    one_line_error(ml("volume", "cp", "cli-a", "cli-a"), "must be different")
    one_line_error(ml("volume", "cp", "cli-a", "cli-b"), "already exists: cli-b")
    one_line_error(ml("volume", "cp", "nope", "cli-d"), "not found: nope")
    for bad in ("../x", ".hidden", "a/b", "", "-x", "x" * 129):
        one_line_error(ml("volume", "create", "--size", "16", "--", bad), "invalid volume name")
    one_line_error(ml("volume", "create", "small", "--size", "8"), "out of range")
    one_line_error(ml("volume", "create", "huge", "--size", str(2 << 20)), "out of range")
    for name in ("cli-a", "cli-b", "cli-c"):
        assert ml("volume", "remove", name, check=True).stdout == \
            f"Removed volume {name}\n".encode()
    one_line_error(ml("volume", "rm", "cli-a"), "named volume not found: cli-a")
    assert volume_files(state_dir) == []  # no temporary file left by any of the above
    assert json.loads(ml("volume", "ls", "--json", check=True).stdout) == []


def test_data_written_in_one_sandbox_is_read_in_the_next(ml: Run, volume: str) -> None:
    r = sh(ml, "--disk", f"@{volume}:/data/vol", script=(
        "set -e; mount | grep ' /data/vol '; mkdir -p /data/vol/d; "
        "seq 1 100000 > /data/vol/d/numbers; echo first > /data/vol/note; "
        "chmod 640 /data/vol/note; ln -s note /data/vol/link"))
    assert r.returncode == 0, r.stderr
    assert b"ext4 (rw,nosuid,nodev" in r.stdout
    r = sh(ml, "--disk", f"@{volume}:/elsewhere", script=(
        "set -e; sha256sum /elsewhere/d/numbers | cut -d' ' -f1; cat /elsewhere/link; "
        "stat -c %a /elsewhere/note; echo second >> /elsewhere/note"))
    assert r.returncode == 0, r.stderr
    numbers = "".join(f"{i}\n" for i in range(1, 100001)).encode()
    assert r.stdout.decode().split() == [hashlib.sha256(numbers).hexdigest(), "first", "640"]
    r = sh(ml, "--disk", f"@{volume}:/v:ro", script="cat /v/note")
    assert r.stdout == b"first\nsecond\n", r.stderr
    # A copy is a new volume with the same data; writing to it leaves the original alone.
    ml("volume", "cp", volume, f"{volume}-copy", check=True)
    try:
        r = sh(ml, "--disk", f"@{volume}-copy:/c", "--disk", f"@{volume}:/o:ro",
               script="echo changed > /c/note; cat /c/note /o/note")
        assert r.stdout == b"changed\nfirst\nsecond\n", r.stderr
    finally:
        ml("volume", "rm", f"{volume}-copy", check=True)


def test_read_only_is_read_only_even_for_a_privileged_guest(ml: Run, volume: str,
                                                            state_dir: Path) -> None:
    path = state_dir / "volumes" / f"{volume}.ext4"
    sh(ml, "--disk", f"@{volume}:/v", script="echo keep > /v/f")
    before = digest(path)
    r = sh(ml, "--disk", f"@{volume}:/v:ro", script="echo x > /v/f; echo rc=$?; cat /v/f")
    assert r.returncode == 0 and r.stdout == b"rc=1\nkeep\n", r.stderr
    assert b"Read-only file system" in r.stderr
    # Root with every capability: remounting, writing a file, writing the device itself.
    r = ml("run", "--privileged", "--disk", f"@{volume}:/v:readonly", "--", "sh", "-c",
           "dev=$(grep ' /v ' /proc/mounts | cut -d' ' -f1); test -b \"$dev\" || exit 9; "
           "mount -o remount,rw /v; echo rc=$?; echo x > /v/f; echo rc=$?; "
           "echo x | dd of=$dev bs=512 count=1 conv=fsync; echo rc=$?")
    rcs = r.stdout.decode().split()
    assert r.returncode == 0 and len(rcs) == 3 and "rc=0" not in rcs, (r.stdout, r.stderr)
    assert digest(path) == before


def test_a_guest_cannot_grow_a_volume(ml: Run, volume: str, state_dir: Path) -> None:
    """The guest sees a 1 TiB device (the slot); QEMU refuses what lies past the file."""
    path = state_dir / "volumes" / f"{volume}.ext4"
    size = path.stat().st_size
    r = ml("run", "--privileged", "--disk", f"@{volume}:/v", "--", "sh", "-c",
           "dev=$(grep ' /v ' /proc/mounts | cut -d' ' -f1); "
           "echo x | dd of=$dev bs=1M seek=100 count=1 conv=fsync 2>/dev/null; echo rc=$?; "
           "dd if=$dev of=/dev/null bs=1M skip=100 count=1 2>/dev/null; echo rc=$?")
    assert r.stdout == b"rc=1\nrc=1\n", (r.stdout, r.stderr)
    assert path.stat().st_size == size


def test_a_host_ext4_file(ml: Run, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img), "32M"], check=True)
    r = sh(ml, "--disk", f"{img}:/mnt/host", script="echo from-guest > /mnt/host/out.txt")
    assert r.returncode == 0, r.stderr
    # Read back without mounting: e2fsprogs parses the image in user space.
    out = subprocess.run(["debugfs", "-R", "cat /out.txt", str(img)], capture_output=True,
                         check=True)
    assert out.stdout == b"from-guest\n"
    fsck = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True)
    assert fsck.returncode == 0, fsck.stdout  # shut down cleanly: nothing to repair
    r = sh(ml, "--disk", f"{img}:/mnt/host:ro", script="cat /mnt/host/out.txt")
    assert r.stdout == b"from-guest\n", r.stderr


def test_one_writer_at_a_time_and_readers_only_without_one(ml: Run, volume: str) -> None:
    writer = ml("run", "-d", "--disk", f"@{volume}:/v", check=True).stdout.decode().strip()
    try:
        ml("exec", writer, "--", "sh", "-c", "echo from-detached > /v/d", check=True)
        one_line_error(ml("run", "--disk", f"@{volume}:/v", "--", "true"), "in use")
        one_line_error(ml("run", "--disk", f"@{volume}:/v:ro", "--", "true"), "in use")
        one_line_error(ml("run", "-d", "--disk", f"@{volume}:/v"), "in use")
        one_line_error(ml("volume", "rm", volume), "in use")
        one_line_error(ml("volume", "cp", volume, f"{volume}-x"), "in use")
    finally:
        ml("rm", "-f", writer, check=True)
    reader = ml("run", "-d", "--disk", f"@{volume}:/v:ro", check=True).stdout.decode().strip()
    try:
        r = sh(ml, "--disk", f"@{volume}:/w:ro", script="ls /w")
        assert r.returncode == 0 and b"lost+found" in r.stdout, r.stderr
        one_line_error(ml("run", "--disk", f"@{volume}:/v", "--", "true"), "in use")
        one_line_error(ml("volume", "rm", volume), "in use")
        ml("volume", "cp", volume, f"{volume}-x", check=True)  # readers do not block a copy
        ml("volume", "rm", f"{volume}-x", check=True)
    finally:
        ml("rm", "-f", reader, check=True)
    r = sh(ml, "--disk", f"@{volume}:/v", script="cat /v/d")  # free again; kill flushed it
    assert r.stdout == b"from-detached\n", r.stderr


def test_a_file_system_the_guest_wrecked_only_fails_the_next_guest(ml: Run, volume: str,
                                                                   state_dir: Path) -> None:
    mounts = Path("/proc/self/mountinfo").read_text()
    r = ml("run", "--privileged", "--disk", f"@{volume}:/v", "--", "sh", "-c",
           "dev=$(grep ' /v ' /proc/mounts | cut -d' ' -f1); "
           "dd if=/dev/urandom of=$dev bs=1024 seek=2 count=256 conv=fsync 2>/dev/null")
    assert r.returncode == 0, r.stderr
    one_line_error(ml("run", "--disk", f"@{volume}:/v", "--", "true"),
                   "mount the disk", "/v", "e2fsck")
    one_line_error(ml("run", "--disk", f"@{volume}:/v:ro", "--", "true"), "mount the disk")
    # The host only copies and deletes the file; its own mounts never changed.
    ml("volume", "cp", volume, f"{volume}-wreck", check=True)
    ml("volume", "rm", f"{volume}-wreck", check=True)
    assert Path("/proc/self/mountinfo").read_text() == mounts


def test_a_sandbox_killed_mid_write_leaves_a_usable_volume(ml: Run, volume: str,
                                                           state_dir: Path) -> None:
    """No clean stop (the timeout kills the VM): what the guest synced survives, the journal
    needs a replay, which a read-only user skips and the next writer does."""
    r = ml("run", "--timeout", "3", "--disk", f"@{volume}:/v", "--", "sh", "-c",
           "echo synced > /v/f; sync; echo unsynced > /v/g; sleep 100")
    assert r.returncode == 124, r.stderr
    r = sh(ml, "--disk", f"@{volume}:/v:ro", script="cat /v/f")
    assert r.stdout == b"synced\n", r.stderr
    r = sh(ml, "--disk", f"@{volume}:/v", script="cat /v/f")
    assert r.stdout == b"synced\n", r.stderr
    fsck = subprocess.run(["e2fsck", "-fn", str(state_dir / "volumes" / f"{volume}.ext4")],
                          capture_output=True)
    assert fsck.returncode == 0, fsck.stdout


def test_bad_disks_fail_in_one_line_and_leave_nothing(ml: Run, volume: str, tmp_path: Path,
                                                      state_dir: Path) -> None:
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"\0" * (2 << 20))
    cases = [
        ("@missing:/v", "named volume not found: missing"),
        (f"{tmp_path}/nope.img:/v", "does not exist"),
        (f"@{volume}", "invalid --disk"),
        (f"@{volume}:/v:rx", "unknown option"),
        (f"@{volume}:v", "not an absolute guest path"),
        (f"@{volume}:/proc/x", "/proc"),
        ("@../etc:/v", "invalid volume name"),
        (f"{plain}:/v", "not an ext4 image"),
        (f"{tmp_path}:/v", "not a regular file"),
    ]
    before = volume_files(state_dir)
    for spec, words in cases:
        one_line_error(ml("run", "--disk", spec, "--", "true"), words)
    one_line_error(ml("run", "-d", "--disk", "@missing:/v"), "named volume not found")
    one_line_error(ml("run", "--disk", f"@{volume}:/a", "--disk", f"@{volume}:/b", "--", "true"),
                   "same file")
    one_line_error(ml("run", "--disk", f"@{volume}:/a", "--disk", f"{plain}:/a/b", "--",
                      "true"), "nested")
    assert volume_files(state_dir) == before


def test_start_with_a_disk_restores_the_snapshot_of_its_shape(volume: str) -> None:
    """A disk is a slot in the machine shape: the second start of that shape is a restore,
    and the disk swapped in after it is the real one."""
    if os.environ.get("MATCHLOCK_SNAPSHOTS") == "0":
        pytest.skip("snapshots disabled")
    from matchlock.guest.protocol import ExecRequest
    from matchlock.image.resolve import resolve_image
    from matchlock.sandbox.core import Sandbox, SandboxOptions
    from matchlock.sandbox.disks import parse_disks

    image = resolve_image(None)
    outputs = []
    for script in ("echo $$ > /v/pid; cat /v/pid", "cat /v/pid"):
        opts = SandboxOptions(image=image.name, rootfs=image.rootfs,
                              disks=parse_disks([f"@{volume}:/v"]))
        with Sandbox(opts) as sb:
            sb.start()
            ex = sb.exec(ExecRequest(argv=["sh", "-c", script]))
            out = b""
            for ev in ex.events():
                out += getattr(ev, "data", b"")
            outputs.append(out)
    assert sb.restored
    assert outputs[0] == outputs[1] and outputs[0].strip().isdigit(), outputs
