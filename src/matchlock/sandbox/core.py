"""One sandbox: a microVM with its own writable layer, reached through the guest agent.

Start-up order is chosen so that every resource is recorded (the sandbox's record in the
state database, which `matchlock gc` reads) before it exists, and `close()` undoes everything
on every path: success, error, signal, timeout or guest panic. Phases, cleanup steps and the
end reason are recorded on the way (`state/registry.py`); a failure to record never stops a
cleanup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from matchlock.errors import GuestError, MatchlockError
from matchlock.guest import protocol as p
from matchlock.guest.client import AgentConnection, AgentGone, Exec
from matchlock.state import endings, registry
from matchlock.vm import confine, qemu
from matchlock.vm.qemu import Disk, VMConfig
from matchlock.vm.qmp import Qmp

if TYPE_CHECKING:
    from matchlock.guest.client import Stream
    from matchlock.sandbox.disks import Disks, DiskSpec
    from matchlock.sandbox.mounts import MountSpec, Shares
    from matchlock.sandbox.network import Egress
    from matchlock.sandbox.ports import PortForwarder, PortSpec

# A host name of dot-separated labels (`override.internal`, as Docker allows), at most 64
# characters: the kernel's limit for a node name.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,64}}\Z){_LABEL}(?:\.{_LABEL})*\Z")
_ROOTFS_HINT = "the image's root filesystem may be damaged; re-import or re-pull it"
MIN_MEMORY_MB = 64
FLUSH_TIMEOUT_S = 10.0  # the guest's sync and power-off when a disk was written


@dataclass
class SandboxOptions:
    image: str
    rootfs: Path | None
    cpus: float = 1.0
    memory_mb: int = 512
    disk_size_mb: int = 5120
    hostname: str | None = None
    accel: str | None = None
    boot_timeout: float = 60.0
    extra_hosts: tuple[str, ...] = ()
    egress: Egress | None = None  # None: no NIC at all
    mounts: tuple[MountSpec, ...] = ()  # sandbox.mounts.parse_mounts
    disks: tuple[DiskSpec, ...] = ()  # sandbox.disks.parse_disks
    keep_dir: bool = False  # close() keeps the directory (logs) for `matchlock rm`
    record: dict[str, Any] = field(default_factory=dict)  # run's choices, for `inspect`

    def validate(self) -> None:
        if not (math.isfinite(self.cpus) and self.cpus > 0):
            raise MatchlockError(f"--cpus must be a positive number, got {self.cpus}")
        host = os.cpu_count() or 1
        if math.ceil(self.cpus) > host:
            raise MatchlockError(
                f"--cpus {self.cpus:g} needs {math.ceil(self.cpus)} vCPUs but the host has {host}",
                hint=f"use --cpus {host} or less",
            )
        if self.memory_mb < MIN_MEMORY_MB:
            raise MatchlockError(
                f"--memory {self.memory_mb} MiB is too small", hint=f"use at least {MIN_MEMORY_MB}"
            )
        if self.hostname is not None and not _HOSTNAME.match(self.hostname):
            raise MatchlockError(
                f"invalid hostname {self.hostname!r}",
                hint="use letters, digits and '-', at most 63 characters",
            )


@dataclass
class Timings:
    phases: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds


class Sandbox:
    def __init__(self, opts: SandboxOptions) -> None:
        opts.validate()
        self.opts = opts
        self.timings = Timings()
        self.accel = ""
        self.accel_reason = ""
        self.dir: Path | None = None
        self.id = ""
        self._owner: registry.Owner | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._vmm: qemu.Vmm | None = None
        self._identity: confine.VmmIdentity | None = None
        self._conn: AgentConnection | None = None
        self._qmp: Qmp | None = None
        self.restored = False
        self._prepared = False  # the root was mounted by PREPARE (here or in the image template)
        self.paused = False
        self._closed = False
        self._abort_reason: str | None = None
        self._shares: Shares | None = None
        self._disks: Disks | None = None
        self._forwarders: list[PortForwarder] = []
        self._fw_lock = threading.Lock()
        self.console = endings.ConsoleFindings()  # read by close(), before the logs go
        self._recorder = _Recorder("")  # close()'s; record_end() gives up when it did

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- start -----------------------------------------------------------------------------

    def start(self) -> None:
        from matchlock.sandbox import boot, template

        self._check_abort()
        t0 = time.perf_counter()
        if self.opts.disks:
            from matchlock.sandbox import disks as extra_disks

            # First: a disk in use by another sandbox fails before anything is created.
            self._disks = extra_disks.open_disks(self.opts.disks)
        arts = boot.artifacts()
        choice = boot.choose_accel(self.opts.accel, arts)
        self.accel, self.accel_reason = choice.accel, choice.reason
        from matchlock.state.config import sandbox_config

        self.dir, self._owner = registry.create_dir(
            self.opts.image, sandbox_config(self.opts, self.opts.record))
        self.id = self._owner.id
        runas: tuple[int, int] | None = None
        chroot: Path | None = None
        if confine.enabled():
            # Released by close() once the VMM is reaped (or by the kernel with this process).
            self._identity = confine.acquire_identity()
            runas, chroot = (self._identity.uid, self._identity.gid), confine.empty_root()
        disks: list[Disk] = []
        late_args: list[str] = []
        snapshots = template.enabled()
        upper: Path | None = None
        if self.opts.rootfs is not None:
            upper = self.dir / "upper.ext4"  # made below, from an image template if there is one
            # Fixed device capacities keep one snapshot valid for every image and disk size.
            # The store built the rootfs read-only at that size; an image larger than it
            # cannot use the shared template.
            snapshots = snapshots and (
                self.opts.rootfs.stat().st_size == template.ROOT_DEVICE_BYTES)
            disks = [Disk(self.opts.rootfs, readonly=True), Disk(upper)]
        vcpus = math.ceil(self.opts.cpus)
        devices = "blk2" if disks else "none"
        nic_args: list[str] = []
        nic_fds: list[int] = []
        if self.opts.egress is not None:
            nic = self.opts.egress.open_link()
            assert nic.tap_fd is not None
            nic_args, nic_fds = nic.qemu_args(), [nic.tap_fd]
            self.opts.egress.start_services(self.id, self.hostname, self.dir)
            devices += "+net"
        if self.opts.mounts:
            from matchlock.sandbox import mounts

            self._shares = mounts.prepare(self.opts.mounts, runas)
            nic_args, nic_fds = nic_args + self._shares.qemu_args, nic_fds + self._shares.fds
            devices += mounts.DEVICES
            chroot = mounts.share_root()
        if self._disks is not None:
            from matchlock.sandbox import disks as extra_disks

            late_args = self._disks.qemu_args()
            devices += extra_disks.devices_key(self._disks.specs)
        tkey = template.key(arts.key, self.accel, vcpus, self.opts.memory_mb, devices)
        tmpl = template.find(tkey) if snapshots else None
        # Host mounts and extra disks are mounted before the root switch: no image template.
        ikey: str | None = None
        warm = template.warm_command()
        if snapshots and self.opts.rootfs is not None and not self.opts.mounts \
                and self._disks is None:
            ikey = template.image_key(tkey, self.opts.rootfs, self.opts.disk_size_mb, warm)
        itmpl = template.find(ikey) if ikey is not None else None
        if upper is not None:
            self._make_upper(upper, itmpl)
        base = VMConfig(
            kernel=arts.kernel, initrd=arts.initrd, accel=self.accel, vcpus=vcpus,
            memory_mb=self.opts.memory_mb, console_log=self.dir / "console.log", disks=disks,
            control_fd=-1, extra_args=nic_args, extra_fds=nic_fds,
            runas=runas, chroot=chroot,
            # Without a NIC the VMM still gets a namespace of its own: no route anywhere.
            private_netns=runas is not None and self.opts.egress is None,
            chroot_proc=self._shares is not None, late_args=late_args,
        )
        self.timings.add("host_prep", time.perf_counter() - t0)
        if itmpl is not None:
            try:
                self._restore(base, itmpl)
                self._prepared = True
            except MatchlockError as e:
                self._check_abort()
                self._agent_log(f"image template restore failed, rebuilding it: {e}")
                template.discard(itmpl)
                self._discard_vm()
                assert upper is not None
                self._make_upper(upper, None)  # the copy belonged to the template's RAM
        if not self._prepared and tmpl is not None:
            try:
                self._restore(base, tmpl, for_template=ikey is not None)
            except MatchlockError as e:
                self._check_abort()  # stopped while restoring: the template is not at fault
                # A template that no longer loads (QEMU upgraded in place, a damaged file) is
                # dropped and rebuilt by the cold boot below.
                self._agent_log(f"snapshot restore failed, booting instead: {e}")
                template.discard(tmpl)
                self._discard_vm()
                tmpl = None
        if not self._prepared and tmpl is None:
            self._cold_boot(base)
            if snapshots:
                t = time.perf_counter()
                try:
                    assert self._qmp is not None and self._proc is not None
                    template.save(self._qmp, self._proc.pid, tkey, self.opts.memory_mb)
                except (MatchlockError, OSError) as e:
                    self._agent_log(f"could not save a snapshot template: {e}")
                self.timings.add("snapshot_save", time.perf_counter() - t)
        if not self._prepared and ikey is not None:
            assert upper is not None and self.opts.rootfs is not None
            self._prepare(ikey, upper, self.opts.rootfs, warm)
        if self._shares is not None:
            self._shares.close()  # QEMU holds its exports now
        if self._disks is not None:
            t = time.perf_counter()
            assert self._qmp is not None
            self._disks.attach(self._qmp)  # after any snapshot: templates hold placeholders
            self.timings.add("disk_attach", time.perf_counter() - t)
        t2 = time.perf_counter()
        if self.opts.rootfs is not None:
            self._setup()
        self.timings.add("agent_ready", time.perf_counter() - t2)
        registry.set_phase(self.id, "running", "restored" if self.restored else "cold boot")

    def _make_upper(self, upper: Path, itmpl: object) -> None:
        from matchlock.sandbox import disk, template

        if isinstance(itmpl, template.Template):
            disk.sparse_copy(itmpl.upper, upper)  # the layer the template's RAM has mounted
        else:
            disk.make_upper(upper, self.opts.disk_size_mb)
        _pad(upper, template.UPPER_DEVICE_BYTES)

    def _prepare(self, ikey: str, upper: Path, rootfs: Path, warm: tuple[str, ...]) -> None:
        """Mount the image's root (PREPARE, which also runs the warm-up command `warm`) and
        save the VM as the image's template, so the next sandboxes of this image start with
        it mounted."""
        from matchlock.sandbox import template

        assert self._conn is not None and self._qmp is not None and self._proc is not None
        t = time.perf_counter()
        try:
            # With a NIC, the template has eth0 configured (the same addresses in every
            # sandbox) and the files for SETUP's resolv.conf and CA ready to be filled in.
            # eth0 comes up only once the firewall and resolver run, as at SETUP.
            egress = self.opts.egress
            net = None
            if egress is not None:
                egress.wait_ready()
                net = egress.guest_config().net_config()
            result = self._conn.prepare(
                p.PrepareRequest(root_dev="vda", upper_dev="vdb", net=net,
                                 clock_ns=time.time_ns(), warm=warm),
                timeout=self.opts.boot_timeout)
        except AgentGone as e:
            raise self.agent_failure(e) from None
        if result.errno:
            raise _setup_error(result)
        self._prepared = True
        self.timings.add("prepare", time.perf_counter() - t)
        t = time.perf_counter()
        try:
            template.save(self._qmp, self._proc.pid, ikey, self.opts.memory_mb, upper=upper,
                          rootfs=rootfs)
        except (MatchlockError, OSError) as e:
            self._agent_log(f"could not save the image template: {e}")
        self.timings.add("snapshot_save", time.perf_counter() - t)

    def _spawn(self, base: VMConfig, ram_file: Path | None = None, ram_fd: int = -1) -> None:
        """Start the VMM with a fresh control channel and QMP socket; its RAM a fresh memfd,
        the template file `ram_file` mapped privately, or the memfd `ram_fd` mapped shared."""
        assert self.dir is not None and self._owner is not None
        host_sock, guest_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        qmp_host, qmp_guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        shared = ram_fd >= 0
        if shared:
            ram_file = Path(f"/proc/self/fd/{ram_fd}")  # the same number in the VMM (pass_fds)
        cfg = dataclasses.replace(base, control_fd=guest_sock.fileno(), qmp_fd=qmp_guest.fileno(),
                                  ram_file=ram_file, ram_shared=shared,
                                  incoming=ram_file is not None,
                                  extra_fds=(*base.extra_fds, *([ram_fd] if shared else [])))
        # A Ctrl-C landing between the VMM's birth and our record of it would orphan the VM.
        # The VMM is born inside the sandbox's network namespace, where its TAP lives.
        egress = self.opts.egress
        netns = egress.nic.netns.enter() if egress and egress.nic else nullcontext()
        with _signals_deferred():
            try:
                with netns:
                    self._vmm = qemu.spawn(cfg, self.dir / "vmm.log")
                    self._proc = self._vmm.proc
            finally:
                guest_sock.close()
                qmp_guest.close()
            self._owner.vmm_pid = self._proc.pid
            self._owner.vmm_start = registry.proc_start_time(self._proc.pid)
            self._owner.save()
            registry.set_phase(self.id, "booting", f"VMM pid {self._proc.pid}")
        self._conn = AgentConnection(host_sock, on_log=self._agent_log)
        self._check_abort()  # abort() may have run before the VMM or its connection existed
        try:
            self._qmp = Qmp(qmp_host, timeout=self.opts.boot_timeout)
        except MatchlockError:
            if self._proc.wait(timeout=5) is not None:
                raise self.vm_died() from None
            raise

    def _cold_boot(self, base: VMConfig) -> None:
        t1 = time.perf_counter()
        self._spawn(base)
        hello = self._wait_hello()
        t2 = time.perf_counter()
        # The guest's boot clock splits the wait into VMM start-up and kernel boot.
        boot_s = min(hello.boot_ns / 1e9, t2 - t1)
        self.timings.add("vmm_start", (t2 - t1) - boot_s)
        self.timings.add("kernel_to_agent", boot_s)

    def _restore(self, base: VMConfig, tmpl: object, for_template: bool = False) -> None:
        """Restore `tmpl`. `for_template`: this VM will be saved as an image template, so its
        RAM is a shared copy of the template's (template.shared_ram), not a private mapping:
        QEMU would put every page of a private mapping in the new template's migration stream,
        and each of its clones would load them all again (see template.shared_ram)."""
        from matchlock.sandbox import template

        assert isinstance(tmpl, template.Template)
        t1 = time.perf_counter()
        if for_template:
            fd = template.shared_ram(tmpl)
            try:
                self._spawn(base, ram_fd=fd)
            finally:
                os.close(fd)  # the VMM has its own
        else:
            self._spawn(base, ram_file=tmpl.ram)
        t2 = time.perf_counter()
        assert self._qmp is not None and self._conn is not None
        template.restore(self._qmp, tmpl)
        try:
            self._conn.ping(timeout=10.0)
        except AgentGone as e:
            raise GuestError(f"the restored guest agent does not answer: {e}") from None
        self.restored = True
        self.timings.add("vmm_start", t2 - t1)
        self.timings.add("restore", time.perf_counter() - t2)

    def _discard_vm(self) -> None:
        """Kill the VMM and drop the channels to it (the sandbox's files stay)."""
        self.kill_vm()
        if self._proc is not None:
            self._proc.wait()
        if self._vmm is not None:
            self._vmm.close_hangup()
        if self._conn is not None:
            self._conn.close()
        if self._qmp is not None:
            self._qmp.close()
        self._proc = self._conn = self._qmp = self._vmm = None

    def _wait_hello(self) -> p.Hello:
        assert self._conn is not None and self._proc is not None
        deadline = time.monotonic() + self.opts.boot_timeout
        while True:
            try:
                return self._conn.wait_hello(timeout=0.05)
            except AgentGone:
                if self._proc.poll() is not None:
                    raise self.vm_died() from None
                if self._conn.error is not None:
                    raise GuestError(f"guest agent failed to start: {self._conn.error}") from None
                if time.monotonic() > deadline:
                    raise GuestError(
                        f"the VM did not start within {self.opts.boot_timeout:.0f}s "
                        f"({self.accel.upper()})",
                        hint=f"see {self.dir}/console.log, or run `matchlock diagnose`",
                    ) from None

    @property
    def hostname(self) -> str:
        return self.opts.hostname or self.id

    def _setup(self) -> None:
        assert self._conn is not None
        net = None
        resolv = None
        egress = self.opts.egress
        ca = None
        late_ca = None
        if egress is not None:
            egress.wait_ready()
            guest = egress.guest_config()
            net, resolv = guest.net_config(), guest.resolv_conf()
            # The agent installs the CA with the image's roots (docs/guest-protocol.md, CA).
            # The proxy makes it while the guest restores; if it is not done yet (about half
            # of the `run`s, 15-80 ms under TCG), SETUP goes without it and it follows.
            if egress.proxy_ready():
                ca = egress.ca_pem()
            else:
                late_ca = egress.ca_pem
        req = p.SetupRequest(
            hostname=self.hostname,
            root_dev=None if self._prepared else "vda",
            upper_dev=None if self._prepared else "vdb",
            clock_ns=time.time_ns(),
            entropy=os.urandom(64),  # what secrets.token_bytes does, without its imports
            hosts_lines=self.opts.extra_hosts,
            cpu_quota_us=self.cpu_quota_us(),
            net=net,
            resolv=resolv,
            mounts=self._shares.setup_fields if self._shares is not None else (),
            disks=self._disks.setup_fields if self._disks is not None else (),
            ca=ca,
        )
        try:
            result = self._conn.setup(req, timeout=self.opts.boot_timeout, late_ca=late_ca)
        except AgentGone as e:
            raise self.agent_failure(e) from None
        if result.errno:
            raise _setup_error(result)

    def cpu_quota_us(self) -> int:
        """A CFS quota when --cpus is not a whole number of vCPUs, else 0 (no limit)."""
        cpus = self.opts.cpus
        if cpus == math.ceil(cpus):
            return 0
        return max(1000, round(cpus * 100_000))

    def _agent_log(self, line: str) -> None:
        if self.dir is not None:
            with open(self.dir / "agent.log", "a") as f:
                f.write(line.rstrip("\n") + "\n")

    # --- use -------------------------------------------------------------------------------

    @property
    def conn(self) -> AgentConnection:
        if self._conn is None:
            raise MatchlockError("the sandbox is not running")
        return self._conn

    def exec(self, req: p.ExecRequest) -> Exec:
        try:
            return self.conn.exec(req)
        except AgentGone as e:
            raise self.agent_failure(e) from None

    # --- pause (warm pools) ---------------------------------------------------------------

    def pause(self) -> None:
        """Stop the vCPUs (QMP `stop`): an idle warm-pool member burns no CPU. The host side
        (proxy, DNS) stays up; requests to the guest wait until resume()."""
        if self._qmp is None:
            raise MatchlockError("the sandbox is not running")
        self._qmp.command("stop")
        self.paused = True

    def resume(self) -> None:
        """Run the vCPUs again (QMP `cont`), then set the guest's wall clock, which stood still
        during the pause, and mix fresh entropy into its RNG (agent RESUME)."""
        if self._qmp is None:
            raise MatchlockError("the sandbox is not running")
        self._qmp.command("cont")
        self.paused = False
        try:
            result = self.conn.resume(time.time_ns(), os.urandom(64))
        except AgentGone as e:
            raise self.agent_failure(e) from None
        if result.errno:
            raise GuestError(f"guest resume failed: {result.message} (errno {result.errno})")

    # --- egress policy at run time (`matchlock allow-list`, the RPC server) --------------------

    def _egress(self) -> Egress:
        egress = self.opts.egress
        if egress is None:
            raise MatchlockError(
                f"sandbox {self.id} has no network (started with --no-network, or without "
                "root), so it has no allow-list to change")
        return egress

    def allow_list(self) -> list[str]:
        """The current allow-list entries, normalized (`api.example.com`, `*.x.org:22`)."""
        return self._egress().allow_list()

    def allow_list_add(self, hosts: Sequence[str]) -> list[str]:
        """Allow more hosts (each `HOST[:PORT]` or comma-separated list of them, parsed as
        --allow-host; all or nothing); returns the entries that were new. Effective for the
        next DNS lookup, connection and request."""
        return self._egress().allow_list_add(hosts)

    def allow_list_delete(self, hosts: Sequence[str]) -> list[str]:
        """Stop allowing entries; returns those that were present. New lookups, connections
        and requests (also on kept-alive connections) are refused from now on, and open
        tunnels (raw TCP, WebSocket) and HTTP exchanges in flight to what is no longer
        allowed are cut."""
        return self._egress().allow_list_delete(hosts)

    # --- ports -------------------------------------------------------------------------------

    def open_port(self, port: int) -> Stream:
        """One TCP connection to 127.0.0.1:`port` inside the guest (over the agent channel,
        so also without a NIC)."""
        try:
            return self.conn.connect(port)
        except AgentGone as e:
            raise self.agent_failure(e) from None

    def forward(self, forwarder: PortForwarder) -> PortForwarder:
        """Start relaying an already bound forwarder to this (started) sandbox; it is closed
        with the sandbox, or earlier by its own close()."""
        conn = self.conn
        with self._fw_lock:
            if self._closed:
                forwarder.close()
                raise MatchlockError("the sandbox is closed")
            self._forwarders.append(forwarder)
        forwarder.start(conn)
        return forwarder

    def publish(self, specs: Sequence[PortSpec],
                addresses: Sequence[str] = ("127.0.0.1",)) -> PortForwarder:
        """Listen on every (address, spec) now (all or nothing; local port 0 = any free port,
        see `.bindings`) and relay each connection to the guest's loopback."""
        from matchlock.sandbox.ports import PortForwarder

        return self.forward(PortForwarder(specs, addresses))

    def agent_failure(self, e: AgentGone) -> MatchlockError:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=0.5)
            if self._proc.poll() is not None:
                return self.vm_died()
        return GuestError(f"lost the guest agent: {e}")

    def vm_died(self) -> MatchlockError:
        """Explain why the VMM exited under us: a guest panic, a QEMU error, or a kill."""
        assert self._proc is not None and self.dir is not None
        code = self._proc.poll()
        console = _tail(self.dir / "console.log")
        panic = [ln for ln in console if "Kernel panic" in ln]
        if panic:
            return GuestError(f"guest kernel panic: {panic[-1].split('] ', 1)[-1].strip()}")
        vmm = [ln for ln in _tail(self.dir / "vmm.log") if ln.strip()]
        if code is not None and code < 0:
            return GuestError(f"the VM process was killed by signal {-code}")
        if vmm:
            return GuestError(f"the VM exited unexpectedly: {vmm[-1].strip()}")
        return GuestError(f"the VM exited unexpectedly (status {code})")

    # --- stop ------------------------------------------------------------------------------

    def abort(self, reason: str) -> None:
        """End the sandbox now, from any thread (a timeout, a signal): the VMM is killed,
        every wait on the agent fails at once, and start() goes no further."""
        self._abort_reason = reason
        self.kill_vm()
        conn = self._conn
        if conn is not None:
            conn.abort(reason)

    def _check_abort(self) -> None:
        if self._abort_reason is not None:
            self.abort(self._abort_reason)
            raise GuestError(f"the sandbox was stopped: {self._abort_reason}")

    def vm_exited(self) -> bool:
        """The VMM has exited (a guest panic, a crash); safe from any thread."""
        proc = self._proc
        return proc is not None and proc.poll() is not None

    def kill_vm(self) -> None:
        proc = self._proc  # read once: another thread (a timeout) may call this during close()
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)

    def _flush_disks(self) -> None:
        """Have the guest write back and remount read-only its disks (SHUTDOWN: kill, sync,
        power off); bounded, and skipped when the sandbox was aborted or the guest is gone."""
        proc, conn = self._proc, self._conn
        if proc is None or conn is None or proc.poll() is not None or self._abort_reason:
            return
        try:
            if self.paused and self._qmp is not None:
                self._qmp.command("cont")  # a paused guest cannot flush
            conn.shutdown()
            proc.wait(timeout=FLUSH_TIMEOUT_S)
        except (AgentGone, MatchlockError, OSError, subprocess.TimeoutExpired) as e:
            self._agent_log(f"disk flush at shutdown did not complete: {e}")

    def close(self) -> None:
        """Tear everything down; safe to call more than once and from any exit path."""
        if self._closed:
            return
        with self._fw_lock:
            self._closed = True
            forwarders, self._forwarders = self._forwarders, []
        t0 = time.perf_counter()
        for fw in forwarders:  # no new connection may reach a VM that is going away
            fw.close()
        note = self._recorder = _Recorder(self.id)
        note(registry.set_phase, "stopping")
        with _signals_deferred():
            # The writable layer is thrown away, so there is nothing to flush: kill the VMM
            # now rather than wait for a guest shutdown; unless a disk was written.
            if self._disks is not None and self._disks.writable:
                self._flush_disks()
            self._discard_vm()
            note(registry.cleanup_step, "vmm")
            if self._disks is not None:
                self._disks.close()  # the locks: the VMM that shared them is gone
                note(registry.cleanup_step, "disks")
            if self._shares is not None:
                self._shares.close()
                note(registry.cleanup_step, "mounts")
            if self._identity is not None:
                self._identity.release()
                note(registry.cleanup_step, "vmm-uid")
            if self.opts.egress is not None:
                self.opts.egress.close()
                note(registry.cleanup_step, "network")
            if self.dir is not None:
                self.console = registry.console_findings(self.dir)
            if self.dir is not None and self.opts.keep_dir:
                (self.dir / "upper.ext4").unlink(missing_ok=True)
                note(registry.cleanup_step, "disk")
                note(registry.set_phase, "stopped")
            elif self.dir is not None and not os.environ.get("MATCHLOCK_KEEP_SANDBOX"):
                registry.remove_dir(self.dir)
                note(registry.cleanup_step, "directory")
                note(registry.set_phase, "removed")
            else:
                note(registry.set_phase, "stopped")
        self.timings.add("teardown", time.perf_counter() - t0)

    def record_end(self, outcome: int | BaseException) -> None:
        """Record why the sandbox ended: the command's exit code, or the error the run ended
        with (a timeout, a signal, a panic, a failure), read with the console's evidence."""
        if not self.id:
            return
        note = self._recorder if self._recorder.sid == self.id else _Recorder(self.id)
        kill = bool(note(registry.kill_requested))
        if isinstance(outcome, int):
            ending = endings.from_exit(outcome, self.console, kill)
        else:
            code = outcome.exit_code if isinstance(outcome, MatchlockError) else 1
            message = outcome.message if isinstance(outcome, MatchlockError) else str(outcome)
            ending = endings.from_error(message or type(outcome).__name__, code, self.console,
                                        kill)
        note(registry.record_end, ending)


def _setup_error(result: p.Result) -> GuestError:
    """The error for a failed PREPARE or SETUP."""
    msg = result.message
    if result.errno == errno.EFBIG and "CA bundle" in msg:
        return GuestError(msg.removesuffix(": File too large"),
                          hint="trim the image's CA bundle, or run with --no-network")
    hint = _ROOTFS_HINT
    if msg.startswith("mount the disk"):
        # Written by an earlier guest: only a guest kernel ever parsed it.
        hint = ("the disk's file system is damaged: check it with `e2fsck -f FILE` "
                "(a volume's FILE is in `matchlock volume ls --json`) or use a copy")
    return GuestError(f"guest set-up failed: {msg} (errno {result.errno}: "
                      f"{os.strerror(result.errno)})", hint=hint)


class _Recorder:
    """Best-effort writes to the state database from teardown paths: a locked or broken
    database must never stop a cleanup (one warning on stderr, then no more attempts)."""

    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.failed = False

    def __call__(self, fn: Any, *args: Any) -> Any:
        if not self.sid or self.failed:
            return None
        try:
            return fn(self.sid, *args)
        except MatchlockError as e:
            self.failed = True
            print(f"matchlock: warning: not recorded: {e}", file=sys.stderr, flush=True)
            return None


_DEFERRED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold interrupting signals until a critical section is over; they are delivered after.

    Blocking them in this thread is not enough: the kernel hands a process-directed signal to
    any thread that does not block it (the egress thread), and Python then runs the handler in
    the main thread, inside the section. So the Python handlers are swapped for one that only
    records, and what it recorded is raised again once the section is over."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signo: int, _frame: object) -> None:
        held.append(signo)

    handlers = {s: signal.signal(s, hold) for s in _DEFERRED}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        for s, h in handlers.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)  # None: not set from Python
        for signo in dict.fromkeys(held):
            signal.raise_signal(signo)


def _pad(path: Path, size: int) -> bool:
    """Grow a sparse disk file to the fixed device size; False when it is already larger."""
    current = path.stat().st_size
    if current > size:
        return False
    if current < size:
        os.truncate(path, size)
    return True


def _tail(path: Path, nbytes: int = 16384) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - nbytes))
            return f.read().decode(errors="replace").splitlines()
    except OSError:
        return []
