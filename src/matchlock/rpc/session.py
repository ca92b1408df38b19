"""The one sandbox an rpc process owns: built from a `create` spec with the same pieces as
`matchlock run` (image resolution, Egress, mounts, Sandbox), and what its methods need (the
EXEC for a command, the image's defaults, the entrypoint started by `launch`)."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matchlock.errors import MatchlockError
from matchlock.guest.client import AgentGone, Exec, Output
from matchlock.guest.protocol import DirEntry, ExecRequest
from matchlock.image.config import ImageConfig
from matchlock.rpc.config import CreateSpec, ExecSpec, MountConfig
from matchlock.rpc.protocol import INVALID_PARAMS, VM_FAILED, RpcError
from matchlock.sandbox.command import compose_env

if TYPE_CHECKING:
    from matchlock.net.audit import AuditEvent
    from matchlock.sandbox.core import Sandbox
    from matchlock.sandbox.disks import DiskSpec
    from matchlock.sandbox.mounts import MountSpec
    from matchlock.sandbox.network import Egress
    from matchlock.sandbox.ports import PortForwarder

ENTRYPOINT_PROBE_S = 0.5
ENTRYPOINT_LOG = "entrypoint.log"


def _params_error(e: MatchlockError) -> RpcError:
    return RpcError(INVALID_PARAMS, f"invalid configuration: {e}")


def _mount_specs(spec: CreateSpec) -> tuple[tuple[MountSpec, ...], tuple[str, ...]]:
    """host_fs/overlay mounts as the CLI's MountSpecs, and the guest paths of memory mounts."""
    from matchlock.sandbox.mounts import MAX_MOUNTS, MountSpec, check_guest_path

    specs: list[MountSpec] = []
    memory: list[str] = []
    seen: list[str] = []
    try:
        for m in spec.mounts:
            guest = check_guest_path(m.guest, f"vfs mount {m.guest!r}")
            for other in seen:
                if guest == other or guest.startswith(other + "/") or other.startswith(
                        guest + "/"):
                    raise MatchlockError(f"vfs mounts {other} and {guest} overlap",
                                         hint="mount them side by side")
            seen.append(guest)
            if m.type == "memory":
                memory.append(guest)
                continue
            specs.append(_host_mount(m, guest, MountSpec))
    except MatchlockError as e:
        raise _params_error(e) from None
    if len(specs) > MAX_MOUNTS:
        raise RpcError(INVALID_PARAMS, f"at most {MAX_MOUNTS} host mounts are supported")
    return tuple(specs), tuple(memory)


def _disk_specs(spec: CreateSpec, mounts: tuple[MountSpec, ...],
                network: bool) -> tuple[DiskSpec, ...]:
    """`extra_disks` as `run --disk` takes them (sandbox/disks.py)."""
    if not spec.extra_disks:
        return ()
    from matchlock.sandbox.disks import check_disks, free_slots, make_disk

    try:
        disks = tuple(make_disk(d.host_path, d.guest_mount, d.readonly,
                                f"{d.host_path}:{d.guest_mount}") for d in spec.extra_disks)
        return check_disks(disks, mounts, free_slots(network, bool(mounts)))
    except MatchlockError as e:
        raise _params_error(e) from None


def _host_mount(m: MountConfig, guest: str, cls: type[MountSpec]) -> MountSpec:
    host = Path(os.path.abspath(m.host_path))
    try:
        st = os.stat(host)
    except OSError as e:
        raise MatchlockError(f"vfs mount {guest}: host path {host}: {e.strerror}") from None
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise MatchlockError(f"vfs mount {guest}: host path {host} is neither a directory "
                             "nor a regular file")
    # overlay: guest writes stay in the guest, as the reference's snapshot copy.
    mode = "overlay" if m.type == "overlay" else "ro" if m.readonly else "host_fs"
    return cls(host=host, guest=guest, mode=mode, spec=f"{host}:{guest}")


def build_egress(spec: CreateSpec, on_event: Callable[[AuditEvent], None] | None) -> Egress | None:
    """The sandbox's network, as `run` would build it from the equivalent flags."""
    from matchlock.net.secrets import make_secret
    from matchlock.sandbox.network import Egress, NetworkOptions

    net = spec.network
    if net.no_network:
        return None
    explicit = bool(net.allowed_hosts or net.secrets or net.add_hosts)
    # As `run`: without root there is no namespace to seal a NIC in; with nothing allowed,
    # no NIC loses nothing.
    if not explicit and os.geteuid() != 0:
        return None
    try:
        secrets = [make_secret(s.name, s.value, s.hosts, s.placeholder) for s in net.secrets]
    except ValueError as e:
        raise RpcError(INVALID_PARAMS, f"invalid configuration: network.secrets: {e}") from None
    opts = NetworkOptions(
        allow_hosts=list(net.allowed_hosts),
        allow_private=[] if net.block_private_ips else ["*"],
        add_hosts=list(net.add_hosts), upstream_dns=list(net.dns_servers),
        extra_secrets=secrets, on_event=on_event, hooks=net.hooks,
        # An SDK has no --upstream-ca: the environment of `matchlock rpc` names it (the
        # standard SSL_CERT_FILE is honoured by the default trust store already).
        upstream_ca=os.environ.get("MATCHLOCK_UPSTREAM_CA") or None,
    )
    try:
        return Egress(opts, environ={})
    except MatchlockError as e:
        raise _params_error(e) from None


def merge_image_config(image: ImageConfig, spec: CreateSpec) -> ImageConfig:
    """The reference's rule: non-empty user/working_dir replace; entrypoint, cmd and env
    replace wholesale when given (even empty)."""
    o = spec.image_config
    return ImageConfig(
        entrypoint=image.entrypoint if o.entrypoint is None else o.entrypoint,
        cmd=image.cmd if o.cmd is None else o.cmd,
        env=image.env if o.env is None else tuple(f"{k}={v}" for k, v in o.env.items()),
        working_dir=o.working_dir or image.working_dir,
        user=o.user or image.user,
    )


@dataclass
class Session:
    sandbox: Sandbox
    spec: CreateSpec
    image: ImageConfig
    memory_mounts: tuple[str, ...] = ()
    entrypoint: Exec | None = None
    # port_forward's listeners (closed with the sandbox, or by the next port_forward)
    forwarder: PortForwarder | None = None
    forward_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def prepare(cls, spec: CreateSpec,
                on_event: Callable[[AuditEvent], None] | None) -> Session:
        """Everything that can be checked or fetched before the VM exists (bad input: -32602,
        a host or image problem: -32000)."""
        from matchlock.image.builtin import BUILTIN_TAG
        from matchlock.image.resolve import resolve_image
        from matchlock.sandbox import boot
        from matchlock.sandbox.core import Sandbox, SandboxOptions

        mounts, memory = _mount_specs(spec)
        egress = build_egress(spec, on_event)  # holds nothing until the sandbox starts
        disks = _disk_specs(spec, mounts, egress is not None)
        hostname = spec.network.hostname or None
        try:
            boot.artifacts()
            resolved = resolve_image(None if spec.image == BUILTIN_TAG else spec.image)
            opts = SandboxOptions(
                image=resolved.name, rootfs=resolved.rootfs, cpus=spec.cpus,
                memory_mb=spec.memory_mb, disk_size_mb=spec.disk_size_mb, hostname=hostname,
                egress=egress, mounts=mounts, disks=disks, keep_dir=True,
            )
            sandbox = Sandbox(opts)
        except MatchlockError as e:
            if egress is not None:
                egress.close()
            raise RpcError(VM_FAILED, str(e)) from None
        return cls(sandbox=sandbox, spec=spec,
                   image=merge_image_config(resolved.config, spec), memory_mounts=memory)

    # --- what a command runs with -----------------------------------------------------------

    def exec_request(self, e: ExecSpec, *, stdin: bool = False, tty: bool = False,
                     argv: list[str] | None = None) -> ExecRequest:
        egress = self.sandbox.opts.egress
        flags = tuple(f"{k}={v}" for k, v in self.spec.env.items())
        env = compose_env(self.image.env, (), flags, self.sandbox.hostname, tty,
                          egress.guest_env() if egress else {})
        return ExecRequest(
            argv=argv if argv is not None else ["sh", "-c", e.command], env=env,
            cwd=e.working_dir or self.image.working_dir or "/",
            user=e.user or self.image.user or None, tty=tty,
            privileged=self.spec.privileged, stdin=stdin, rows=e.rows, cols=e.cols,
        )

    def exec(self, req: ExecRequest) -> Exec:
        return self.sandbox.exec(req)

    # --- after start --------------------------------------------------------------------------

    def finish_start(self) -> None:
        """Memory mounts, then the image's entrypoint when `launch` asked for it."""
        for path in self.memory_mounts:
            # Made by root, given to the image's user: that is who runs the commands.
            argv = ["mkdir", "-p", "--", path]
            if self.image.user:
                argv = ["sh", "-c", 'mkdir -p -- "$1" && chown -- "$2" "$1"', "sh", path,
                        self.image.user]
            code = self._run(argv)
            if code != 0:
                raise MatchlockError(f"cannot create the memory mount {path} (exit {code})")
        if self.spec.launch_entrypoint:
            self._start_entrypoint()

    def _run(self, argv: list[str]) -> int:
        ex = self.exec(self.exec_request(ExecSpec(command="", user="0"), argv=argv))
        for _ in ex.events():
            pass
        assert ex.status is not None
        return ex.status.code

    def _start_entrypoint(self) -> None:
        argv = [*self.image.entrypoint, *self.image.cmd]
        if not argv:
            return
        assert self.sandbox.dir is not None
        log = self.sandbox.dir / ENTRYPOINT_LOG
        ex = self.exec(self.exec_request(ExecSpec(command=""), argv=argv))
        self.entrypoint = ex
        ended = threading.Event()

        def drain() -> None:
            try:
                with open(log, "ab") as f:
                    for ev in ex.events():
                        if isinstance(ev, Output):
                            f.write(ev.data)
                            f.flush()
            except (AgentGone, OSError):
                pass
            finally:
                ended.set()

        threading.Thread(target=drain, name="rpc-entrypoint", daemon=True).start()
        # As the reference: an entrypoint that fails at once fails the create; one that is
        # still running after the probe is left running.
        if ended.wait(ENTRYPOINT_PROBE_S) and ex.status is not None and ex.status.code != 0:
            raise MatchlockError(f"start image entrypoint: exit code {ex.status.code}")
        if ended.is_set() and ex.status is None:
            raise MatchlockError("start image entrypoint: lost the guest agent")

    def stop_entrypoint(self) -> None:
        ex = self.entrypoint
        if ex is not None and ex.status is None:
            with contextlib.suppress(AgentGone):
                ex.kill()


# --- list_files entries in the reference's form -------------------------------------------------

# Go's os.FileMode type bits (the reference sends `mode` as a FileMode).
_GO_DIR = 1 << 31
_GO_SYMLINK = 1 << 27
_GO_DEVICE = 1 << 26
_GO_PIPE = 1 << 25
_GO_SOCKET = 1 << 24
_GO_SETUID = 1 << 23
_GO_SETGID = 1 << 22
_GO_CHARDEV = 1 << 21
_GO_STICKY = 1 << 20


def go_file_mode(mode: int) -> int:
    out = mode & 0o777
    fmt = stat.S_IFMT(mode)
    out |= {stat.S_IFDIR: _GO_DIR, stat.S_IFLNK: _GO_SYMLINK, stat.S_IFIFO: _GO_PIPE,
            stat.S_IFSOCK: _GO_SOCKET, stat.S_IFBLK: _GO_DEVICE,
            stat.S_IFCHR: _GO_DEVICE | _GO_CHARDEV}.get(fmt, 0)
    if mode & stat.S_ISUID:
        out |= _GO_SETUID
    if mode & stat.S_ISGID:
        out |= _GO_SETGID
    if mode & stat.S_ISVTX:
        out |= _GO_STICKY
    return out


def rfc3339(seconds: int) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):
        return "0001-01-01T00:00:00Z"


def file_info(e: DirEntry) -> dict[str, Any]:
    return {"name": e.name, "size": e.size, "mode": go_file_mode(e.mode),
            "mod_time": rfc3339(e.mtime), "is_dir": e.is_dir}
