"""Exec wrapper for the VMM: what used to run in a `preexec_fn`, in a process of its own.

`python -I -S vmm_exec.py [--ctty FD] [--netns] [--proc DIR] [--filter HEX] -- QEMU ARGS...`

The owner is multi-threaded (the agent reader, the egress proxy), and running Python code
between fork and exec there (`preexec_fn`: ctypes calls, signal-mask changes) can deadlock
on a lock another thread held at the fork. So the child is forked and exec'd by C code
(`subprocess` with `start_new_session`) into this script, a fresh single-threaded
interpreter (~10 ms) that imports nothing of matchlock, and which then, in order:

1. asks for SIGKILL when its parent (the owner) dies, and exits if it already has;
2. clears the blocked-signal mask (QEMU must receive the hang-up's SIGHUP);
3. takes the pty slave FD as controlling terminal (hang-up on owner death, `vm.confine`);
4. unshares its network namespace (`--netns`: a VMM without a NIC reaches nothing);
   with `--proc DIR` (a VMM serving mounts: QEMU 7.2's 9p changes modes through
   /proc/self/fd), unshares its mount namespace and mounts there, at DIR inside its future
   chroot, a /proc that shows only processes of its own uid and nothing else
   (`hidepid=invisible,subset=pid`);
5. installs the set*id seccomp filter (`--filter`, last: it forbids setsid);

and becomes QEMU with `execv`, keeping its pid (and so the owner's record of it).
"""

import ctypes
import fcntl
import os
import signal
import sys
import termios

_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_CLONE_NEWNET = 0x40000000
_CLONE_NEWNS = 0x00020000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def main(args: list[str]) -> None:
    ctty, netns, program, proc = None, False, b"", b""
    while args and args[0] != "--":
        opt = args.pop(0)
        if opt == "--ctty":
            ctty = int(args.pop(0))
        elif opt == "--netns":
            netns = True
        elif opt == "--proc":
            proc = os.fsencode(args.pop(0))
        elif opt == "--filter":
            program = bytes.fromhex(args.pop(0))
        else:
            raise SystemExit(f"vmm_exec: unknown option {opt}")
    argv = args[1:]
    if not argv:
        raise SystemExit("vmm_exec: no command")
    parent = int(os.environ.pop("MATCHLOCK_VMM_OWNER", "0"))
    libc = ctypes.CDLL(None, use_errno=True)
    _check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")
    if parent and os.getppid() != parent:
        os._exit(1)  # the owner died before PDEATHSIG was armed
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    if ctty is not None:
        fcntl.ioctl(ctty, termios.TIOCSCTTY, 0)
        os.close(ctty)
    if netns:
        _check(libc.unshare(_CLONE_NEWNET), "unshare(CLONE_NEWNET)")
    if proc:
        _check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
        _check(libc.mount(b"proc", proc, b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                          b"hidepid=invisible,subset=pid"), "mount the VMM's /proc")
    if program:
        buf = ctypes.create_string_buffer(program, len(program))
        prog = _SockFprog(len(program) // 8, ctypes.addressof(buf))
        _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
        _check(libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0),
               "PR_SET_SECCOMP")
    os.execv(argv[0], argv)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except OSError as e:
        print(f"matchlock: cannot start the VMM: {e}", file=sys.stderr)
        os._exit(127)
