"""Guest privileges, tried as an attacker who is root in a default exec.

Root in the guest owns its files but must not rewire what the host set up: the interface,
addresses, routes and MTU, the virtio devices, the kernel's knobs in /sys and /proc/sys, the
clock, the CPU quota. Each attempt below must fail in a default exec, and leave the guest as it
was; where a harmless variant exists, a `--privileged` exec must still succeed with it, so these
tests fail when the drop stops happening as well as when it breaks the privileged path.

One booted sandbox per image serves the whole module: a successful attack would be a failure
anyway, and every privileged variant restores what it changed. No packet leaves the guest:
the only peers are loopback and the sandbox's own network namespace.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from matchlock.sandbox.network import Egress, NetworkOptions

from .guest_util import Guest, booted

pytestmark = [
    pytest.mark.vm,
    # Without root the host cannot create the sandbox's network namespace, so no eth0.
    pytest.mark.skipif(os.geteuid() != 0, reason="the guest's NIC needs root on the host"),
]

# Capability numbers (<linux/capability.h>).
DROPPED = {
    "NET_ADMIN": 12, "NET_RAW": 13, "SYS_MODULE": 16, "SYS_RAWIO": 17, "SYS_PTRACE": 19,
    "SYS_ADMIN": 21, "SYS_BOOT": 22, "SYS_NICE": 23, "SYS_RESOURCE": 24, "SYS_TIME": 25,
    "PERFMON": 38, "BPF": 39,
}
KEPT = {
    "CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "FSETID": 4, "KILL": 5, "SETGID": 6,
    "SETUID": 7, "SETPCAP": 8, "NET_BIND_SERVICE": 10, "SYS_CHROOT": 18, "MKNOD": 27,
    "SETFCAP": 31,
}


@pytest.fixture(scope="module")
def box(state_dir: Path) -> Iterator[Guest]:
    """The default busybox image with the default sealed network (eth0 configured)."""
    with booted(None, Egress(NetworkOptions())) as g:
        yield g


@pytest.fixture(scope="module")
def py(python_image: str) -> Iterator[Guest]:
    with booted(python_image, None) as g:
        yield g


# What the host configured, and the knobs an attack would turn (must read the same after).
STATE = ("cat /sys/class/net/eth0/mtu /sys/class/net/eth0/address /sys/class/net/eth0/flags; "
         "ip addr show | grep inet; ip route; "
         "for d in /sys/bus/virtio/devices/*; do echo ${d##*/} $(readlink $d/driver); done; "
         "cd /proc/sys; cat net/ipv4/ip_forward net/ipv4/ping_group_range kernel/hostname "
         "kernel/sched_rt_runtime_us")


@pytest.fixture(scope="module")
def state_before(box: Guest) -> str:
    code, out, err = box.sh(STATE)
    assert code == 0, err
    assert "inet 10.213.0.2/24" in out and "default via 10.213.0.1" in out
    return out


def _caps(status: str) -> dict[str, int]:
    return {k: int(v, 16) for k, _, v in (ln.partition(":\t") for ln in status.splitlines())
            if k.startswith("Cap")}


def test_default_exec_lacks_the_dropped_capabilities_in_every_set(box: Guest) -> None:
    code, out, err = box.sh("cat /proc/self/status")
    assert code == 0, err
    caps = _caps(out)
    for name in ("CapBnd", "CapPrm", "CapEff", "CapInh", "CapAmb"):
        present = {c for c, n in DROPPED.items() if caps[name] >> n & 1}
        assert not present, f"{name} still has {present}"
    missing = {c for c, n in KEPT.items() if not caps["CapEff"] >> n & 1}
    assert not missing, f"root lost {missing}"
    code, out, _ = box.sh("cat /proc/self/status", privileged=True)
    assert all(_caps(out)["CapEff"] >> n & 1 for n in DROPPED.values())


# (attack, text its error must contain, a harmless variant that --privileged must be able to
# run, or None). An attack is a shell snippet that exits 0 only if it got through. The ones
# that would wreck the shared sandbox if they got through come last, so that such a failure
# does not hide the others.
ATTACKS = {
    "mtu": ("ip link set eth0 mtu 1000", "Operation not permitted",
            "ip link set eth0 mtu 1400 && [ $(cat /sys/class/net/eth0/mtu) = 1400 ] && "
            "ip link set eth0 mtu 1500"),
    "address add": ("ip addr add 10.213.0.9/24 dev eth0", "Operation not permitted",
                    "ip addr add 10.213.0.9/32 dev eth0 && ip addr del 10.213.0.9/32 dev eth0"),
    "route add": ("ip route add 192.0.2.0/24 via 10.213.0.1", "Operation not permitted",
                  "ip route add 192.0.2.0/24 via 10.213.0.1 && ip route del 192.0.2.0/24"),
    "sysfs mtu": ("echo 1000 > /sys/class/net/eth0/mtu", "Read-only file system",
                  "echo 1500 > /sys/class/net/eth0/mtu"),
    "sysfs remount": ("mount -o remount,rw /sys", "permission denied", None),
    "sysfs unmount": ("umount /sys", "Operation not permitted", None),
    "private mounts": ("unshare -m sh -c 'mount -o remount,rw /sys'", "Operation not permitted",
                       None),
    "ip_forward": ("echo 1 > /proc/sys/net/ipv4/ip_forward", "Read-only file system",
                   "v=$(cat /proc/sys/net/ipv4/ip_forward); "
                   "echo $v > /proc/sys/net/ipv4/ip_forward"),
    # Would let ICMP sockets be opened without CAP_NET_RAW.
    "ping_group_range": ("echo '0 2147483647' > /proc/sys/net/ipv4/ping_group_range",
                         "Read-only file system", None),
    # sethostname(2) needs CAP_SYS_ADMIN; this file does not.
    "hostname": ("echo evil > /proc/sys/kernel/hostname", "Read-only file system", None),
    # RT tasks could then take a whole vCPU, not 95 % (not that they can run: no CAP_SYS_NICE).
    "rt throttling": ("echo -1 > /proc/sys/kernel/sched_rt_runtime_us", "Read-only file system",
                      None),
    "proc/sys unmount": ("umount /proc/sys", "Operation not permitted", None),
    # 'h' only prints help; 'b', 'c', 'i' would reboot, crash, or kill every exec.
    "sysrq": ("echo h > /proc/sysrq-trigger", "Read-only file system",
              "echo h > /proc/sysrq-trigger"),
    "raw socket (ping)": ("ping -c1 -W2 127.0.0.1", "permission denied", "ping -c1 -W2 127.0.0.1"),
    "packet socket (arping)": ("arping -c1 -w1 -I eth0 10.213.0.1", "Operation not permitted",
                               None),
    "clock": ("date -s '2001-01-01 00:00:00' && [ $(date +%Y) = 2001 ]",
              "Operation not permitted", None),
    "nice": ("renice -n -5 -p $$", "Permission denied", "renice -n -5 -p $$"),
    # A real-time limit above 0 would allow SCHED_FIFO, which escapes a --cpus quota.
    "rtprio limit": ("ulimit -r 1", "Operation not permitted", "ulimit -r 1"),
    "static arp": ("arp -s 10.213.0.1 02:00:00:00:00:01", "Operation not permitted", None),
    "mac": ("ip link set eth0 address 02:6d:6c:00:00:09", "Operation not permitted", None),
    "address change": ("ifconfig eth0 10.213.0.3", "Operation not permitted", None),
    "address delete": ("ip addr del 10.213.0.2/24 dev eth0", "Operation not permitted", None),
    "route delete": ("ip route del default", "Operation not permitted", None),
    "link down": ("ip link set eth0 down", "Operation not permitted", None),
    # Every bound virtio device: the NIC, the disks, the control channel, the RNG.
    "sysfs unbind": ("for d in /sys/bus/virtio/devices/*; do "
                     "echo ${d##*/} > $d/driver/unbind && exit 0; done; exit 1",
                     "Read-only file system", None),
}


@pytest.mark.parametrize("name", [n for n, a in ATTACKS.items() if a[2]])
def test_privileged_exec_still_can(box: Guest, state_before: str, name: str) -> None:
    code, out, err = box.sh(ATTACKS[name][2] or "", privileged=True)
    assert code == 0, f"{name}: {out}{err}"
    code, after, _ = box.sh(STATE)
    assert (code, after) == (0, state_before)


def test_sys_and_proc_sys_are_read_only_only_for_default_execs(box: Guest) -> None:
    script = ("awk '$5 == \"/sys\" || $5 ~ \"^/sys/\" || $5 == \"/proc/sys\" "
              "{ split($6, o, \",\"); print $5, o[1] }' /proc/self/mountinfo")
    code, out, err = box.sh(script)
    assert code == 0, err
    top = {}
    for line in out.splitlines():  # the last mount at a path is the one that is seen
        path, mode = line.split()
        top[path] = mode
    assert top.keys() >= {"/sys", "/proc/sys"}, out
    assert set(top.values()) == {"ro"}, out
    code, out, _ = box.sh(script, privileged=True)
    assert [ln.split()[1] for ln in out.splitlines() if ln.split()[0] == "/sys"] == ["rw"]


def test_the_fd_limit_can_still_be_raised(box: Guest) -> None:
    # Without CAP_SYS_RESOURCE root cannot raise the hard limit; it starts high instead.
    code, out, err = box.sh("ulimit -n; ulimit -n 65536 && ulimit -n")
    assert code == 0, err
    assert out.split() == ["1024", "65536"]


def test_root_still_does_root_things(box: Guest) -> None:
    code, out, err = box.sh(
        "set -e; echo x > /etc/owned; chown nobody:nogroup /etc/owned; chmod 4755 /etc/owned; "
        "stat -c '%U %a' /etc/owned; mknod /tmp/null c 1 3; echo gone > /tmp/null; "
        "su nobody -s /bin/sh -c 'id -u'; chroot / true; nc -l -p 80 </dev/null >/dev/null & "
        "sleep 1; netstat -ltn | grep -c ':80 '; dmesg >/dev/null && echo ok")
    assert code == 0, err
    assert out.split() == ["nobody", "4755", "65534", "1", "ok"]


def test_pip_and_python_as_root(py: Guest) -> None:
    code, out, err = py.sh(
        "set -e; pip --version; python3 -m venv --without-pip /tmp/v; /tmp/v/bin/python -V; "
        "echo x > /usr/local/lib/marker; chown appuser /usr/local/lib/marker; "
        "su appuser -s /bin/sh -c 'cat /usr/local/lib/marker'")
    assert code == 0, err
    assert out.startswith("pip ") and out.split()[-1] == "x", out


RAW = """
import ctypes, socket
libc = ctypes.CDLL(None, use_errno=True)

def fifo():  # musl stubs sched_setscheduler out (ENOSYS): the system call itself
    if libc.syscall(144, 0, 1, ctypes.byref(ctypes.c_int(1))):  # SCHED_FIFO, priority 1
        raise OSError(ctypes.get_errno(), "sched_setscheduler")

for name, make in [
    ("raw", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
    ("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)),
    ("icmp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)),
    ("fifo", fifo),
]:
    try:
        make()
        print(name, "ok")
    except OSError as e:
        print(name, e.errno)
"""


def test_raw_sockets_and_realtime_from_python(py: Guest) -> None:
    # Nothing is sent: opening the socket (or switching policy) is the whole test.
    code, out, err = py.sh(f"python3 -c '{RAW}'")
    assert code == 0, err
    eperm, eacces = str(1), str(13)
    assert dict(ln.split() for ln in out.splitlines()) == {
        "raw": eperm, "packet": eperm, "icmp": eacces, "fifo": eperm}
    code, out, err = py.sh(f"python3 -c '{RAW}'", privileged=True)
    assert code == 0, err
    assert dict(ln.split() for ln in out.splitlines()) == {
        "raw": "ok", "packet": "ok", "icmp": eacces, "fifo": "ok"}


# Last: an attack that got through may leave the sandbox broken for what follows.
@pytest.mark.parametrize("name", ATTACKS)
def test_attack_fails_in_a_default_exec(box: Guest, state_before: str, name: str) -> None:
    attack, error, _ = ATTACKS[name]
    # Compared with the state just before (not state_before): one attack that got through
    # should not fail the others too.
    code, before, _ = box.sh(STATE)
    assert code == 0
    code, out, err = box.sh(attack)
    assert code != 0, f"{name} got through: {out}{err}"
    assert error in err, err
    code, after, _ = box.sh(STATE)
    assert (code, after) == (0, before)
