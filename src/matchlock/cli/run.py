"""`matchlock run`: boot a sandbox, run one command in it, pass its exit code through.

The click command: `--help`, errors, `--pool`, and whatever cli/fastrun.py (the click-free
reading of the common forms) leaves to it. Both run cli/runbody.py's `execute`."""

from __future__ import annotations

import sys
from typing import Any

import click

from matchlock.cli.fastrun import rewrite_rm
from matchlock.cli.runbody import execute
from matchlock.errors import MatchlockError
from matchlock.sandbox.command import (
    DEFAULT_PATH,
    compose_argv,
    compose_env,
    hide_from_children,
    read_env_file,
)
from matchlock.sandbox.envspec import parse_env_entry

# Re-exported: they were defined here before they moved to the sandbox layer.
__all__ = ["DEFAULT_PATH", "compose_argv", "compose_env", "hide_from_children",
           "parse_env_entry", "read_env_file", "run"]


class _RunCommand(click.Command):
    """Also takes the reference's spelling `--rm=false` / `--rm=true` (a click boolean flag
    takes no value), in the options only: the command's own arguments are never touched."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        takes_value = {name for p in self.params if isinstance(p, click.Option)
                       and not p.is_flag for name in p.opts}
        return super().parse_args(ctx, rewrite_rm(args, takes_value))


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
def run(pool: str | None = None, **params: Any) -> None:
    """Run COMMAND in a new ephemeral microVM booted from an OCI image."""
    if pool is not None:
        _claim(pool, params["detach"], params["command"])
    execute(**params)


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

