"""An anonymous network namespace per sandbox, held only by file descriptors.

Nothing is named in /run/netns: the namespace lives exactly as long as something references
it (our fd, a socket created inside it, a process such as the VMM running in it) and the
kernel destroys it with the last reference. A SIGKILLed owner therefore leaks nothing: its fds
and sockets close, the VMM dies of PR_SET_PDEATHSIG, and the namespace goes with them.

Namespaces are per *thread* on Linux. The namespace is created by a short-lived thread of its
own, so the caller's thread never leaves the host namespace by accident; `enter()` moves the
calling thread in and back for the few operations that must happen inside (creating the TAP
and the listening sockets, loading the firewall, spawning the VMM).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from matchlock.net.link import set_up

CLONE_NEWNET = 0x40000000
_SELF_NS = "/proc/thread-self/ns/net"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


class NetnsError(OSError):
    pass


def _unshare_net() -> None:
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


def _write_sysctl(path: str, value: str) -> None:
    # /proc/sys/net/* resolves to the namespace of the thread that opens it (verified by
    # tests/unit/test_net_netns.py), so this must run on a thread inside the namespace.
    with open(path, "w") as f:
        f.write(value)


class SandboxNetns:
    """A fresh network namespace with `lo` up and IPv6 disabled."""

    def __init__(self) -> None:
        self._fd = -1
        result: list[int] = []
        errors: list[BaseException] = []

        def create() -> None:
            # This thread ends inside the new namespace; nothing else ever runs on it.
            try:
                _unshare_net()
                fd = os.open(_SELF_NS, os.O_RDONLY | os.O_CLOEXEC)
                result.append(fd)
                _configure_inside()
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=create, name="matchlock-netns", daemon=True)
        t.start()
        t.join()
        if result:
            self._fd = result[0]
        if errors:
            self.close()
            raise errors[0]

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError("the namespace is closed")
        return self._fd

    @property
    def inode(self) -> int:
        """The namespace's identity (what `readlink /proc/PID/ns/net` shows as net:[N])."""
        return os.fstat(self.fd).st_ino

    @property
    def path(self) -> str:
        """A path to the namespace that this process's children can open while it is alive,
        e.g. for `ip link set DEV netns PATH`."""
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    @contextlib.contextmanager
    def enter(self) -> Iterator[None]:
        """Run the body with the *calling thread* inside the namespace.

        Sockets and TAP devices created, and processes spawned, in the body belong to the
        namespace. Other threads are unaffected. Processes spawned here inherit the thread's
        namespace, but PR_SET_PDEATHSIG fires when the spawning *thread* exits, so spawn the
        VMM from a long-lived thread (this one), never from a temporary one.
        """
        target = self.fd
        host = os.open(_SELF_NS, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                # setns into a namespace we hold an fd to does not fail for root; if it ever
                # did, this thread would stay in the sandbox's namespace, so let it propagate.
                _setns(host)
        finally:
            os.close(host)

    def run(
        self, argv: Sequence[str], **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """subprocess.run inside the namespace."""
        with self.enter():
            return subprocess.run(argv, **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """subprocess.Popen inside the namespace (see `enter` about PDEATHSIG)."""
        with self.enter():
            return subprocess.Popen(argv, **kwargs)

    def socket(
        self,
        family: int = socket.AF_INET,
        type: int = socket.SOCK_STREAM,
        proto: int = 0,
    ) -> socket.socket:
        """A socket that belongs to the namespace (a socket's namespace is fixed at creation)."""
        with self.enter():
            return socket.socket(family, type, proto)

    def close(self) -> None:
        """Drop our reference; the namespace dies once sockets and processes in it are gone."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def detach(self) -> int:
        """Give up ownership of the fd (the caller closes it); the object becomes closed."""
        fd, self._fd = self.fd, -1
        return fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def __enter__(self) -> SandboxNetns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _configure_inside() -> None:
    """Bring `lo` up and turn IPv6 off; runs on a thread inside the new namespace."""
    # `default` covers interfaces created later (the TAP), `all` those that exist (lo).
    for conf in ("all", "default"):
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "1")
    set_up("lo")
