"""The VMM of a running sandbox, seen from the host: its own uid, an empty root, seccomp, no
capabilities, no route but its TAP; private templates; and it dies with its owner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from matchlock.paths import cache_dir, runtime_dir
from matchlock.vm import confine

from .conftest import MATCHLOCK, leftovers, new_owner, sandbox_owners

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="the uid drop and the chroot need root"),
]
Run = Callable[..., subprocess.CompletedProcess[bytes]]


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _vmm_of(owner: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                st = _status(int(entry.name))
            except OSError:
                continue
            if st.get("PPid") == str(owner) and st.get("Name", "").startswith("qemu-system"):
                return int(entry.name)
        time.sleep(0.05)
    raise AssertionError(f"no VMM under pid {owner}")


@contextmanager
def _sandbox(*run_args: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A sandbox that stays up (its guest sleeps) while the test looks at its VMM."""
    before = sandbox_owners()
    proc = subprocess.Popen([MATCHLOCK, "run", *run_args, "--", "sh", "-c",
                             "echo ready; exec sleep 600"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == b"ready\n", proc.stderr.read() if proc.stderr else b""
        yield proc, _vmm_of(new_owner(before))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def _interfaces(pid: int) -> set[str]:
    lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    return {ln.split(":")[0].strip() for ln in lines}


def _routes(pid: int) -> list[tuple[str, str]]:
    """(interface, destination in hex) of the main routing table of pid's namespace."""
    lines = Path(f"/proc/{pid}/net/route").read_text().splitlines()[1:]
    return [(ln.split()[0], ln.split()[1]) for ln in lines]


def test_the_vmm_runs_confined(ml: Run, state_dir: Path) -> None:
    ml("run", "--", "true", check=True)  # a template exists: the next sandbox is restored
    with _sandbox() as (_proc, pid):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"-incoming" in cmdline  # the restore path, with its stream passed as an fd
        st = _status(pid)
        uids, gids = st["Uid"].split(), st["Gid"].split()
        assert len(set(uids)) == 1 and len(set(gids)) == 1  # real, effective, saved, fs
        assert int(uids[0]) != 0 and int(gids[0]) != 0
        assert confine.UID_BASE <= int(uids[0]) < confine.UID_BASE + confine.UID_SLOTS
        assert st["Groups"] == gids[0]
        assert st["CapEff"] == st["CapPrm"] == "0000000000000000"
        assert st["Seccomp"] == "2"
        assert st["NoNewPrivs"] == "1"
        root = runtime_dir() / "vmm-root"
        assert os.readlink(f"/proc/{pid}/root") == str(root)
        assert os.listdir(f"/proc/{pid}/root/") == []  # no host file in sight
        assert root.stat().st_uid == 0 and root.stat().st_mode & 0o222 == 0
        # The sealed network: its namespace has the TAP and loopback, and routes nowhere else.
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        assert _interfaces(pid) == {"lo", "tap0"}
        routes = _routes(pid)
        assert routes and all(iface == "tap0" for iface, _ in routes)
        assert all(dest != "00000000" for _, dest in routes)  # no default route
    assert leftovers(state_dir) == []


def test_without_network_the_vmm_has_no_interface_up(state_dir: Path) -> None:
    with _sandbox("--no-network") as (_proc, pid):
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        assert _interfaces(pid) == {"lo"}
        assert _routes(pid) == []
        assert _status(pid)["Seccomp"] == "2"
    assert leftovers(state_dir) == []


def test_concurrent_vmms_have_distinct_uids(state_dir: Path) -> None:
    with _sandbox() as (_p1, vmm1), _sandbox("--no-network") as (_p2, vmm2):
        uid1, uid2 = (int(_status(p)["Uid"].split()[0]) for p in (vmm1, vmm2))
        assert uid1 != uid2
        # A process with the first VMM's ids may signal it, and not the second one.
        probe = ("import os, sys; os.setgroups([]); os.setgid({u}); os.setuid({u})\n"
                 "for pid in map(int, sys.argv[1:]):\n"
                 "    try: os.kill(pid, 0); print('may signal')\n"
                 "    except PermissionError: print('EPERM')\n")
        r = subprocess.run([sys.executable, "-c", probe.format(u=uid1), str(vmm1), str(vmm2)],
                           capture_output=True, timeout=30)
        assert r.stdout.decode().split("\n")[:2] == ["may signal", "EPERM"], r.stderr
    assert leftovers(state_dir) == []


def test_templates_are_private(ml: Run) -> None:
    ml("run", "--", "true", check=True)
    ml("run", "--no-network", "--", "true", check=True)
    root = cache_dir() / "templates"
    assert root.stat().st_mode & 0o777 == 0o700
    # Templates written since this change (a restore rebuilds any older one it meets).
    current = [t for t in root.iterdir()
               if t.is_dir() and not t.name.startswith(".")
               and (t / "complete").exists() and (t / "complete").stat().st_size > 0]
    assert len(current) >= 2
    for t in current:
        assert t.stat().st_mode & 0o777 == 0o700, t
        for f in t.iterdir():
            assert f.stat().st_mode & 0o777 == 0o600, f
            assert f.stat().st_uid == os.geteuid()


def test_the_vmm_dies_with_its_owner(state_dir: Path) -> None:
    """Dropping privileges clears PR_SET_PDEATHSIG; the hang-up of the owner's terminal
    takes its place."""
    before = sandbox_owners()
    proc = subprocess.Popen([MATCHLOCK, "run", "--", "sh", "-c", "echo ready; sleep 600"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    owner = new_owner(before)
    vmm = _vmm_of(owner)
    assert int(_status(vmm)["Uid"].split()[0]) != 0
    os.kill(owner, signal.SIGKILL)  # the owner (the fork server's fork, or `run` itself)
    proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            state = _status(vmm)["State"]
        except OSError:
            break  # gone
        if state.startswith("Z"):
            break  # exited; nobody has reaped it yet
        time.sleep(0.05)
    else:
        raise AssertionError("the VMM outlived its owner")
    r = subprocess.run([MATCHLOCK, "gc"], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert leftovers(state_dir) == []


def test_diagnose_reports_the_confinement() -> None:
    r = subprocess.run([MATCHLOCK, "diagnose", "--json"], capture_output=True, text=True,
                       timeout=600)
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    check = checks["vmm confinement"]
    assert check["status"] == "pass"
    assert check["message"] == (f"seccomp + uid {confine.UID_BASE}+n per sandbox + chroot "
                                f"{runtime_dir() / 'vmm-root'}")
