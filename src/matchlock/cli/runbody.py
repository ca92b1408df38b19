"""What `matchlock run` does once its arguments are read, free of click: the click command
(cli/run.py) and the click-free parser of the common forms (cli/fastrun.py) both call
`execute`. Heavy modules are imported where they are needed (tests/unit/test_cli_imports.py).
"""

from __future__ import annotations

import math
import os
import sys

from matchlock.errors import MatchlockError
from matchlock.sandbox.command import compose_argv, hide_from_children

TYPE_CHECKING = False  # not `typing`'s: that module alone is ~2 ms of every start
if TYPE_CHECKING:
    from matchlock.sandbox.disks import DiskSpec
    from matchlock.sandbox.mounts import MountSpec


def parse_memory(value: str) -> int:
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


def execute(
    *, image: str | None, envs: tuple[str, ...], env_files: tuple[str, ...],
    workdir: str | None, user: str | None, entrypoint: str | None, cpus: str, memory: str,
    disk_size: str, timeout: float | None, hostname: str | None, interactive: bool, tty: bool,
    privileged: bool, rm: bool, no_network: bool, accel: str | None, command: tuple[str, ...],
    pull: bool, allow_hosts: tuple[str, ...], secret_specs: tuple[str, ...],
    add_hosts: tuple[str, ...], allow_private: tuple[str, ...], upstream_ca: str | None,
    upstream_dns: tuple[str, ...], log_network: bool, secret_files: tuple[str, ...],
    max_connections: int | None, workspace: str | None, volumes: tuple[str, ...],
    detach: bool, publish: tuple[str, ...], publish_address: tuple[str, ...],
    disk_specs: tuple[str, ...], pool_member: str | None,
) -> None:
    """Run COMMAND in a new microVM (never returns: exits with the command's code). The
    click command handles `--pool` itself before it gets here."""
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
        memory_mb=parse_memory(memory), disk_size_mb=parse_memory(disk_size),
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


def _record(argv: list[str], timeout: float | None, envs: tuple[str, ...],
            env_files: tuple[str, ...], workdir: str | None, user: str | None,
            privileged: bool, detach: bool) -> dict[str, object]:
    """The run's choices as `inspect` shows them: environment *names* only (values may be
    secrets)."""
    from matchlock.state.config import env_names

    return {"command": argv, "timeout": timeout, "env": env_names(envs),
            "env_files": list(env_files), "workdir": workdir, "user": user,
            "privileged": privileged, "detach": detach}
