"""The VMM's confinement pieces that need no VM: uid slots, the empty root, the set*id
filter."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from matchlock.errors import MatchlockError
from matchlock.vm import confine

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


# --- uid slots -------------------------------------------------------------------------------


def test_identities_are_distinct_while_held_and_freed_on_release(tmp_path: Path) -> None:
    held = [confine.acquire_identity(tmp_path) for _ in range(20)]
    uids = {i.uid for i in held}
    assert len(uids) == 20
    assert all(confine.UID_BASE <= u < confine.UID_BASE + confine.UID_SLOTS for u in uids)
    assert all(i.uid == i.gid for i in held)
    ids_dir = tmp_path / "vmm-ids"
    assert stat.S_IMODE(ids_dir.stat().st_mode) == 0o700
    assert len(list(ids_dir.iterdir())) == 20
    for i in held:
        i.release()
        i.release()  # idempotent
    assert list(ids_dir.iterdir()) == []


def test_a_slot_locked_by_another_process_is_skipped(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Another process holds slot 5; the search starts there and must move on.
    ids_dir = tmp_path / "vmm-ids"
    ids_dir.mkdir(mode=0o700)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl,sys; f=open(sys.argv[1],'w'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); sys.stdin.read()", str(ids_dir / "5")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        monkeypatch.setattr("secrets.randbelow", lambda n: 5)  # confine imports it lazily
        ident = confine.acquire_identity(tmp_path)
        assert ident.uid == confine.UID_BASE + 6
        ident.release()
    finally:
        holder.kill()
        holder.wait()


def test_gc_removes_only_the_slot_files_nobody_holds(tmp_path: Path) -> None:
    held = confine.acquire_identity(tmp_path)
    ids_dir = tmp_path / "vmm-ids"
    for stale in ("17", "4000"):  # left by owners killed with SIGKILL
        (ids_dir / stale).touch()
    assert confine.remove_stale_ids(tmp_path) == 2
    assert [p.name for p in ids_dir.iterdir()] == [str(held.uid - confine.UID_BASE)]
    held.release()
    assert confine.remove_stale_ids(tmp_path) == 0
    assert confine.remove_stale_ids(tmp_path / "absent") == 0


# --- the empty root --------------------------------------------------------------------------


@root_only
def test_empty_root_is_roots_read_only_and_empty(tmp_path: Path) -> None:
    root = confine.empty_root(tmp_path / "run")
    st = root.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o555)
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o700
    assert confine.empty_root(tmp_path / "run") == root  # reused
    os.chmod(root, 0o777)
    assert stat.S_IMODE(confine.empty_root(tmp_path / "run").stat().st_mode) == 0o555
    (root / "planted").touch()
    with pytest.raises(MatchlockError, match="not empty"):
        confine.empty_root(tmp_path / "run")


# --- the set*id filter -----------------------------------------------------------------------

U = G = confine.UID_BASE + 4242
_CHILD = """
import os, sys
from matchlock.vm import confine
confine.PreparedFilter(confine.setid_filter({u}, {g})).install()
def attempt(name, *args):
    try:
        getattr(os, name)(*args)
        print(name, "ok", flush=True)
    except PermissionError:
        print(name, "EPERM", flush=True)
{body}
"""


def _run_filtered(body: str) -> tuple[int, list[str]]:
    code = _CHILD.format(u=U, g=G, body=body)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    return r.returncode, r.stdout.decode().splitlines()


@root_only
@pytest.mark.skipif(not confine.filter_supported(), reason="x86_64 syscall numbers")
def test_only_the_drop_that_runas_makes_is_allowed() -> None:
    rc, out = _run_filtered(f"""
attempt("setgid", 0)
attempt("setgroups", [0, 1])
attempt("setgid", {G})
attempt("setgroups", [{G}])
attempt("setuid", 0)
attempt("setuid", {U})
attempt("setuid", 0)      # what QEMU checks after its drop
attempt("setuid", {U})    # the same id again: harmless, allowed
print(os.getuid(), os.getgid(), os.getgroups(), flush=True)
""")
    assert rc == 0
    assert out == ["setgid EPERM", "setgroups EPERM", "setgid ok", "setgroups ok",
                   "setuid EPERM", "setuid ok", "setuid EPERM", "setuid ok",
                   f"{U} {G} [{G}]"]


@root_only
@pytest.mark.skipif(not confine.filter_supported(), reason="x86_64 syscall numbers")
@pytest.mark.parametrize("call", ["os.setresuid(0, 0, 0)", "os.setreuid(0, 0)",
                                  "os.setresgid(0, 0, 0)", "os.setsid()", "os.setpgid(0, 0)"])
def test_other_credential_calls_kill_the_process(call: str) -> None:
    rc, out = _run_filtered(f"print('before', flush=True)\n{call}\nprint('after', flush=True)")
    assert rc == -signal.SIGSYS
    assert out == ["before"]


def test_filter_jumps_are_resolved() -> None:
    prog = confine.setid_filter(U, G)
    assert len(prog) % 8 == 0 and len(prog) // 8 < 64
    with pytest.raises(ValueError, match="out of range"):
        confine._assemble([(0x15, "far", 0, 1), *[(0x06, 0, 0, 0)] * 300, "far",
                           (0x06, 0, 0, 0)])
