"""`matchlock run`: boot a sandbox, run one command in it, pass its exit code through."""

from __future__ import annotations

import math
import os
import sys
from typing import TYPE_CHECKING

import click

from matchlock.errors import MatchlockError
from matchlock.sandbox.command import (
    DEFAULT_PATH,
    compose_argv,
    compose_env,
    hide_from_children,
    read_env_file,
)
from matchlock.sandbox.envspec import parse_env_entry

if TYPE_CHECKING:
    from matchlock.sandbox.disks import DiskSpec
    from matchlock.sandbox.mounts import MountSpec

# Re-exported: they were defined here before they moved to the sandbox layer.
__all__ = ["DEFAULT_PATH", "compose_argv", "compose_env", "hide_from_children",
           "parse_env_entry", "read_env_file", "run"]


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


_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class _RunCommand(click.Command):
    """Also takes the reference's spelling `--rm=false` / `--rm=true` (a click boolean flag
    takes no value), in the options only: the command's own arguments are never touched."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        takes_value = {name for p in self.params if isinstance(p, click.Option)
                       and not p.is_flag for name in p.opts}
        out = list(args)
        i = 0
        while i < len(out):
            tok = out[i]
            if tok == "--" or not tok.startswith("-"):
                break  # the command starts here
            if tok.startswith("--rm="):
                value = _BOOL_WORDS.get(tok[5:].lower())
                if value is None:
                    raise MatchlockError(f"invalid {tok!r}", hint="use --rm=true or --rm=false")
                out[i] = "--rm" if value else "--no-rm"
            elif tok in takes_value:
                i += 1  # its value follows
            i += 1
        return super().parse_args(ctx, out)


@click.command(cls=_RunCommand, context_settings={"allow_interspersed_args": False})
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
@click.option("-d", "--detach", is_flag=True,
              help="Keep the sandbox running in the background; print its id.")
@click.option("--privileged", is_flag=True, help="No seccomp, capability drop or no_new_privs.")
@click.option("--rm/--no-rm", "rm", default=True, show_default=True,
              help="Remove the sandbox when the command exits. --rm=false (or --no-rm): keep "
              "it running afterwards (exec-able) until `matchlock kill`.")
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
@click.option("--disk", "disk_specs", multiple=True, metavar="@VOLUME|FILE:GUEST[:ro]",
              help="Attach a named volume or an ext4 image file, mounted at GUEST; data "
              "persists. Repeatable.")
@click.option("-p", "--publish", "publish", multiple=True, metavar="[LOCAL:]REMOTE",
              help="Relay host port LOCAL (default: REMOTE) to guest port REMOTE on the "
              "guest's loopback, over the agent channel (works with --no-network). Repeatable.")
@click.option("--address", "publish_address", multiple=True, metavar="IP",
              help="Host address that published ports listen on (repeatable or "
              "comma-separated; default 127.0.0.1; localhost = 127.0.0.1).")
@click.option("--pool", "pool", default=None, metavar="NAME",
              help="With -d: take a ready sandbox of the warm pool NAME (`matchlock pool`), "
              "with the pool's configuration; only a command may be given.")
@click.option("--pool-member", "pool_member", default=None, hidden=True)
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
    volumes: tuple[str, ...] = (), detach: bool = False,
    publish: tuple[str, ...] = (),
    publish_address: tuple[str, ...] = (), disk_specs: tuple[str, ...] = (),
    pool: str | None = None, pool_member: str | None = None,
) -> None:
    """Run COMMAND in a new ephemeral microVM booted from an OCI image."""
    if pool is not None:
        _claim(pool, detach, command)
    if pool_member is not None and (command or not detach or publish):
        raise MatchlockError("a pool member is detached, with no command and no -p")
    from matchlock.image.resolve import resolve_image
    from matchlock.sandbox.attach import RunRequest, run_attached
    from matchlock.sandbox.core import Sandbox, SandboxOptions

    if detach and (interactive or tty):
        raise MatchlockError("-d cannot be combined with -i or -t",
                             hint="start it with -d, then `matchlock exec -i ID -- CMD`")
    launcher = os.environ.pop("MATCHLOCK_SUPERVISOR", None) if detach else None
    if detach and not launcher:
        from matchlock.sandbox.supervisor import launch

        sys.exit(launch(sys.argv[1:]))
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
    from matchlock.sandbox.network import Egress, NetworkOptions
    from matchlock.sandbox.ports import check_available, parse_publish

    addresses = tuple(a.strip() for v in publish_address for a in v.split(",")
                      if a.strip()) or ("127.0.0.1",)
    ports = parse_publish(publish, addresses)
    check_available(ports, addresses)
    # The mount and disk modules (~4 ms of imports) only when asked for: no -v, no --disk,
    # no mounts or disks (their parsers give () then).
    mounts: tuple[MountSpec, ...] = ()
    if volumes or workspace is not None:
        from matchlock.sandbox.mounts import parse_mounts

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
    disks: tuple[DiskSpec, ...] = ()
    if disk_specs:
        from matchlock.sandbox.disks import free_slots, parse_disks

        disks = parse_disks(disk_specs, mounts, free_slots(egress is not None, bool(mounts)))
    boot.artifacts()  # fail fast, before any image work, when the host is not set up
    resolved = resolve_image(image, pull=pull)
    cfg = resolved.config
    # -d and --rm=false run only what was asked for (no image default), except -it.
    keep = detach or not rm
    argv = (compose_argv(cfg, command, entrypoint)
            if command or not keep or (tty and interactive) else [])
    opts = SandboxOptions(
        image=resolved.name, rootfs=resolved.rootfs, cpus=cpu_count,
        memory_mb=_parse_memory(memory), disk_size_mb=_parse_memory(disk_size),
        hostname=hostname, accel=accel, egress=egress, mounts=mounts, keep_dir=keep,
        disks=disks,
        record=_record(argv, timeout, envs, env_files, workdir, user, privileged, detach),
    )
    req = RunRequest(
        argv=argv, image=cfg, env_files=env_files, env=envs, workdir=workdir, user=user,
        tty=tty, interactive=interactive, privileged=privileged, timeout=timeout,
        publish=tuple(ports), publish_address=addresses,
    )
    sandbox = Sandbox(opts)
    try:
        if keep:
            from matchlock.sandbox.supervisor import Supervisor

            sys.exit(Supervisor(sandbox, req, argv or None if detach else None, timeout,
                                foreground=not detach,
                                launcher=int(launcher) if launcher and launcher.isdigit()
                                else None, pool=pool_member, entrypoint=entrypoint).run())
        code = run_attached(sandbox, req)
    except (MatchlockError, OSError) as e:
        sandbox.record_end(e)  # why it ended, for `matchlock inspect`
        raise
    sandbox.record_end(code)
    sys.exit(code)


def _claim(name: str, detach: bool, command: tuple[str, ...]) -> None:
    """`run -d --pool NAME [-- CMD]`: the pool's configuration, exactly; no other option."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    given = [p.opts[-1] for p in ctx.command.params
             if p.name not in ("pool", "detach", "command") and p.name is not None
             and ctx.get_parameter_source(p.name) not in (ParameterSource.DEFAULT, None)]
    if not detach:
        raise MatchlockError("--pool needs -d", hint="matchlock run -d --pool NAME -- CMD")
    if given:
        raise MatchlockError(f"--pool takes the pool's configuration: drop {', '.join(given)}")
    from matchlock.sandbox.pool import claim

    print(claim(name, list(command)), flush=True)
    sys.exit(0)


def _record(argv: list[str], timeout: float | None, envs: tuple[str, ...],
            env_files: tuple[str, ...], workdir: str | None, user: str | None,
            privileged: bool, detach: bool) -> dict[str, object]:
    """The run's choices as `inspect` shows them: environment *names* only (values may be
    secrets)."""
    from matchlock.state.config import env_names

    return {"command": argv, "timeout": timeout, "env": env_names(envs),
            "env_files": list(env_files), "workdir": workdir, "user": user,
            "privileged": privileged, "detach": detach}
