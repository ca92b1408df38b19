"""`matchlock run`: boot a sandbox, run one command in it, pass its exit code through."""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from collections.abc import Container, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import click

from matchlock.errors import MatchlockError
from matchlock.image.config import ImageConfig

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
KILL_GRACE_S = 5.0
TIMEOUT_EXIT = 124


def parse_env_entry(entry: str, origin: str) -> tuple[str, str]:
    name, sep, value = entry.partition("=")
    if not name or "\0" in entry or any(c.isspace() for c in name):
        raise MatchlockError(f"invalid environment variable {entry!r} ({origin})",
                             hint="use KEY=VALUE or KEY")
    if not sep:
        host_value = os.environ.get(name)
        if host_value is None:
            raise MatchlockError(
                f"environment variable {name} is not set on the host ({origin})",
                hint=f"set it, or pass -e {name}=VALUE",
            )
        return name, host_value
    return name, value


def hide_from_children(names: Iterable[str]) -> None:
    """Drop host environment variables that hold secret values (`--secret NAME@host`) from
    this process's environment, which every child inherits: QEMU, the process a guest
    escape would land in, must not find the values in its own environment. The secrets were
    read already; -e/--env-file of these names are moot (the placeholder wins)."""
    for name in names:
        os.environ.pop(name, None)


def read_env_file(path: str, skip: Container[str] = ()) -> list[tuple[str, str]]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise MatchlockError(f"cannot read env file {path}: {e.strerror}") from None
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#") or line.partition("=")[0] in skip:
            continue
        out.append(parse_env_entry(line, f"{path}:{n}"))
    return out


def compose_env(
    image_env: tuple[str, ...], files: tuple[str, ...], flags: tuple[str, ...], hostname: str,
    tty: bool, network: dict[str, str] | None = None,
) -> list[str]:
    """Image ENV, env files in order, -e, then the network's (CA paths, secret placeholders);
    later wins, order of first appearance kept. A secret's placeholder always wins: a -e of the
    same name must not put a real value where the user asked for a placeholder (so such
    entries are not even looked up: `hide_from_children` removed them from the host's)."""
    network = network or {}
    env: dict[str, str] = {}
    for entry in image_env:
        name, sep, value = entry.partition("=")
        if name and sep:
            env[name] = value
    for path in files:
        env.update(read_env_file(path, network))
    for entry in flags:
        if entry.partition("=")[0] in network:
            continue
        name, value = parse_env_entry(entry, "-e")
        env[name] = value
    env.update(network)
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOSTNAME", hostname)
    if tty:
        env.setdefault("TERM", os.environ.get("TERM", "xterm"))
    return [f"{k}={v}" for k, v in env.items()]


def compose_argv(
    config: ImageConfig, args: tuple[str, ...], entrypoint: str | None
) -> list[str]:
    """Docker's rules: --entrypoint replaces ENTRYPOINT and drops the image's CMD."""
    if entrypoint is not None:
        ep: tuple[str, ...] = (entrypoint,) if entrypoint else ()
        cmd = args
    else:
        ep = config.entrypoint
        cmd = args or config.cmd
    argv = [*ep, *cmd]
    if not argv:
        raise MatchlockError("no command given and the image defines none",
                             hint="add a command after the flags: matchlock run -- CMD")
    return argv


def _parse_memory(value: str) -> int:
    v = value.strip().lower()
    mult = 1
    for suffix, m in (("gib", 1024), ("gb", 1024), ("g", 1024), ("mib", 1), ("mb", 1), ("m", 1)):
        if v.endswith(suffix):
            v, mult = v[: -len(suffix)], m
            break
    try:
        n = float(v) * mult
    except ValueError:
        raise MatchlockError(
            f"invalid size {value!r}", hint="use MiB or a suffix: 512, 1g"
        ) from None
    if not math.isfinite(n) or n <= 0:
        raise MatchlockError(f"invalid size {value!r}", hint="use a positive size such as 512m")
    return int(n)


@click.command(context_settings={"allow_interspersed_args": False})
@click.option("--image", default=None,
              help="Image reference or local tag (default: built-in busybox).")
@click.option("--pull", "pull", is_flag=True,
              help="Ask the registry for the image even if it is cached.")
@click.option("-e", "--env", "envs", multiple=True, help="KEY=VALUE, or KEY to copy from the host.")
@click.option("--env-file", "env_files", multiple=True, help="File of KEY=VALUE lines.")
@click.option("-w", "--workdir", default=None, help="Working directory in the guest.")
@click.option("-u", "--user", default=None, help="uid, uid:gid, or user name from the image.")
@click.option("--entrypoint", default=None, help='Replace the image ENTRYPOINT ("" clears it).')
@click.option("--cpus", default="1", help="vCPUs (fractional values are rounded up).")
@click.option("--memory", default="512", help="Guest memory in MiB (or 1g, 768m).")
@click.option("--disk-size", default="5120", help="Writable layer size in MiB (or 10g).")
@click.option("--timeout", type=float, default=None,
              help="Kill the sandbox after this many seconds.")
@click.option("--hostname", default=None, help="Guest hostname (default: the sandbox id).")
@click.option("-i", "--interactive", is_flag=True, help="Forward stdin to the command.")
@click.option("-t", "--tty", is_flag=True, help="Run the command on a pseudo-terminal.")
@click.option("--privileged", is_flag=True, help="No seccomp, capability drop or no_new_privs.")
@click.option("--rm/--no-rm", "rm", default=True, show_default=True,
              help="Remove the sandbox when the command exits.")
@click.option("--no-network", is_flag=True, help="Give the VM no network device at all.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="HOST[:PORT]",
              help="Allow egress to a host glob (*.x.com), ports 80/443 unless :PORT given; "
              "'*' allows every public host. Repeatable, comma-separated.")
@click.option("--secret", "secret_specs", multiple=True, metavar="NAME[=VALUE]@HOST[,HOST]",
              help="Inject a secret on requests to HOSTs; the guest sees a placeholder. "
              "NAME@HOST takes the value from $NAME; NAME=VALUE shows it in ps and history.")
@click.option("--secret-file", "secret_files", multiple=True, metavar="NAME=PATH@HOST[,HOST]",
              help="Like --secret, the value read from a file (one line; a final newline is "
              "dropped).")
@click.option("--add-host", "add_hosts", multiple=True, metavar="HOST:IP",
              help="Pin HOST to IP for egress (also allows a private IP).")
@click.option("--allow-private-host", "allow_private", multiple=True, metavar="HOST",
              help="Let HOST resolve to private, loopback or link-local addresses.")
@click.option("--upstream-ca", default=None, metavar="FILE",
              help="Extra CA that upstream TLS certificates may chain to.")
@click.option("--upstream-dns", "upstream_dns", multiple=True, metavar="IP[:PORT]",
              help="Resolve egress host names with this server instead of the host's.")
@click.option("--log-network", is_flag=True, help="Print every request and block to stderr.")
@click.option("--max-connections", type=click.IntRange(min=1), default=None, metavar="N",
              help="Concurrent guest TCP connections the proxy accepts (default 512).")
@click.option("--accel", default=None, help="kvm, tcg or auto (env MATCHLOCK_ACCEL).")
@click.option("--workspace", default=None, metavar="DIR",
              help="Guest directory that -v mounts go in (default /workspace).")
@click.option("-v", "--volume", "volumes", multiple=True,
              metavar="HOST:GUEST[:ro|overlay|host_fs]",
              help="Mount a host directory or file; overlay (default): guest writes stay in "
              "the guest; ro: read-only; host_fs: writes reach the host. Repeatable.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(
    image: str | None, envs: tuple[str, ...], env_files: tuple[str, ...], workdir: str | None,
    user: str | None, entrypoint: str | None, cpus: str, memory: str, disk_size: str,
    timeout: float | None, hostname: str | None, interactive: bool, tty: bool,
    privileged: bool, rm: bool, no_network: bool, accel: str | None, command: tuple[str, ...],
    pull: bool = False, allow_hosts: tuple[str, ...] = (), secret_specs: tuple[str, ...] = (),
    add_hosts: tuple[str, ...] = (), allow_private: tuple[str, ...] = (),
    upstream_ca: str | None = None, upstream_dns: tuple[str, ...] = (),
    log_network: bool = False, secret_files: tuple[str, ...] = (),
    max_connections: int | None = None, workspace: str | None = None,
    volumes: tuple[str, ...] = (),
) -> None:
    """Run COMMAND in a new ephemeral microVM booted from an OCI image."""
    from matchlock.guest.protocol import ExecRequest
    from matchlock.image.resolve import resolve_image
    from matchlock.sandbox.core import Sandbox, SandboxOptions

    if not rm:
        raise MatchlockError("--no-rm (long-lived sandboxes) is not available yet",
                             hint="omit it; every run is ephemeral for now")
    try:
        cpu_count = float(cpus)
    except ValueError:
        raise MatchlockError(
            f"invalid --cpus {cpus!r}", hint="use a number such as 1 or 0.5"
        ) from None
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise MatchlockError(
            f"invalid --timeout {timeout}", hint="use a positive number of seconds"
        )
    if workdir is not None and not workdir.startswith("/"):
        raise MatchlockError(f"--workdir {workdir!r} is not absolute", hint="use an absolute path")
    if tty and interactive and not sys.stdin.isatty():
        raise MatchlockError("-it needs a terminal on stdin", hint="drop -t to pipe stdin instead")

    from matchlock.sandbox import boot
    from matchlock.sandbox.mounts import parse_mounts
    from matchlock.sandbox.network import Egress, NetworkOptions

    mounts = parse_mounts(volumes, workspace)

    net_flags = (allow_hosts or secret_specs or secret_files or add_hosts or allow_private
                 or upstream_ca)
    if no_network and net_flags:
        raise MatchlockError("--no-network cannot be combined with --allow-host, --secret, "
                             "--secret-file, --add-host, --allow-private-host or --upstream-ca")
    egress = None
    # Without root there is no network namespace to seal a NIC in; with nothing allowed, no
    # NIC loses nothing, so only an explicit network flag makes root a requirement.
    if not no_network and (net_flags or os.geteuid() == 0):
        egress = Egress(NetworkOptions(
            allow_hosts=list(allow_hosts), allow_private=list(allow_private),
            add_hosts=list(add_hosts), secrets=list(secret_specs),
            secret_files=list(secret_files), upstream_ca=upstream_ca,
            upstream_dns=list(upstream_dns), log_network=log_network,
            max_connections=max_connections or 0,
        ))
        hide_from_children(egress.environ_secret_names)
    boot.artifacts()  # fail fast, before any image work, when the host is not set up
    resolved = resolve_image(image, pull=pull)
    cfg = resolved.config
    argv = compose_argv(cfg, command, entrypoint)
    opts = SandboxOptions(
        image=resolved.name, rootfs=resolved.rootfs, cpus=cpu_count,
        memory_mb=_parse_memory(memory), disk_size_mb=_parse_memory(disk_size),
        hostname=hostname, accel=accel, egress=egress, mounts=mounts,
    )
    sandbox = Sandbox(opts)
    timer = _Timeout(timeout, sandbox)
    with _signals() as pending, sandbox:
        timer.start()
        try:
            sandbox.start()
            env = compose_env(cfg.env, env_files, envs, hostname or sandbox.id, tty,
                              egress.guest_env() if egress else {})
            rows, cols = _term_size()
            req = ExecRequest(
                argv=argv, env=env, cwd=workdir or cfg.working_dir or "/",
                user=user if user is not None else (cfg.user or None),
                tty=tty, privileged=privileged, stdin=interactive, rows=rows, cols=cols,
            )
            code = _attach(sandbox, req, interactive, tty, pending)
        except MatchlockError:
            if timer.fired:
                raise timer.error() from None
            raise
        finally:
            timer.cancel()
    sys.exit(code)


class _Timeout:
    def __init__(self, seconds: float | None, sandbox: object) -> None:
        from matchlock.sandbox.core import Sandbox

        assert isinstance(sandbox, Sandbox)
        self.seconds = seconds
        self.sandbox = sandbox
        self.fired = False
        self._timer: threading.Timer | None = None

    def _fire(self) -> None:
        self.fired = True
        self.sandbox.kill_vm()

    def start(self) -> None:
        if self.seconds is not None:
            self._timer = threading.Timer(self.seconds, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def error(self) -> MatchlockError:
        return MatchlockError(
            f"timed out after {self.seconds:g}s; the sandbox was killed", exit_code=TIMEOUT_EXIT
        )


def _term_size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(sys.stdin.fileno())
        return size.lines, size.columns
    except OSError:
        return 24, 80


class _Pending:
    """Signals received while the command runs, forwarded from the main thread."""

    def __init__(self) -> None:
        self.exec: object | None = None
        self.count = 0


@contextmanager
def _signals() -> Iterator[_Pending]:
    pending = _Pending()

    def handler(signo: int, frame: FrameType | None) -> None:
        from matchlock.guest.client import Exec

        ex = pending.exec
        if not isinstance(ex, Exec):
            # Still booting: abort; the sandbox is torn down on the way out.
            raise KeyboardInterrupt
        pending.count += 1
        if pending.count == 1:
            ex.signal(signo)
            t = threading.Timer(KILL_GRACE_S, ex.kill)
            t.daemon = True
            t.start()
        else:
            ex.kill()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield pending
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _attach(sandbox: object, req: object, interactive: bool, tty: bool, pending: _Pending) -> int:
    from matchlock.guest.client import AgentGone, Exec, Output
    from matchlock.guest.protocol import ExecRequest
    from matchlock.sandbox.core import Sandbox

    assert isinstance(sandbox, Sandbox) and isinstance(req, ExecRequest)
    ex: Exec = sandbox.exec(req)
    pending.exec = ex
    if interactive:
        threading.Thread(target=_pump_stdin, args=(ex,), daemon=True).start()
    out = sys.stdout.buffer
    err = sys.stderr.buffer
    with _raw_terminal(tty and interactive, ex):
        try:
            for event in ex.events():
                if isinstance(event, Output):
                    stream = out if event.stream == "stdout" else err
                    stream.write(event.data)
                    stream.flush()
        except AgentGone as e:
            raise sandbox._agent_failure(e) from None
        except BrokenPipeError:
            ex.kill()
            return 141
    assert ex.status is not None
    return ex.status.code


def _pump_stdin(ex: object) -> None:
    from matchlock.guest.client import AgentGone, Exec

    assert isinstance(ex, Exec)
    fd = sys.stdin.fileno()
    try:
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            ex.write_stdin(data)
        ex.close_stdin()
    except (AgentGone, OSError):
        pass


@contextmanager
def _raw_terminal(enabled: bool, ex: object) -> Iterator[None]:
    if not enabled:
        yield
        return
    import termios
    import tty as ttymod

    from matchlock.guest.client import Exec

    assert isinstance(ex, Exec)
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)

    def on_winch(signo: int, frame: FrameType | None) -> None:
        rows, cols = _term_size()
        ex.resize(rows, cols)

    old = signal.signal(signal.SIGWINCH, on_winch)
    ttymod.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, old)
