"""The `matchlock` command: subcommands are imported lazily to keep start-up fast."""

from __future__ import annotations

import sys
from typing import Any

import click

from matchlock import __version__
from matchlock.cli import signals
from matchlock.cli.signals import Interrupted
from matchlock.errors import MatchlockError

_COMMANDS = {
    "run": ("matchlock.cli.run", "run", "Run a command in a new ephemeral microVM."),
    "image": ("matchlock.cli.image", "image", "Manage local images."),
    "pull": ("matchlock.cli.pull", "pull", "Pull an image from a registry."),
    "diagnose": ("matchlock.cli.diagnose", "diagnose", "Check that this host can run sandboxes."),
    "setup": ("matchlock.cli.setup", "setup", "Install and build what sandboxes need (root)."),
    "gc": ("matchlock.cli.gc", "gc", "Remove what dead sandboxes left behind."),
    "exec": ("matchlock.cli.exec", "exec_", "Run a command in a running sandbox."),
    "ls": ("matchlock.cli.lifecycle", "ls", "List sandboxes."),
    "kill": ("matchlock.cli.lifecycle", "kill", "Stop a running sandbox."),
    "rm": ("matchlock.cli.lifecycle", "rm", "Remove a stopped or crashed sandbox."),
    "list": ("matchlock.cli.lifecycle", "ls", "List sandboxes (same as ls)."),
    "remove": ("matchlock.cli.lifecycle", "rm", "Remove a sandbox (same as rm)."),
    "prune": ("matchlock.cli.lifecycle", "prune", "Remove every stopped or crashed sandbox."),
    "get": ("matchlock.cli.inspect", "get", "Print a sandbox's record (JSON)."),
    "inspect": ("matchlock.cli.inspect", "inspect",
                "Print everything recorded about a sandbox (JSON)."),
    "stat": ("matchlock.cli.inspect", "inspect", "Same as inspect."),
    "log": ("matchlock.cli.log", "log", "Print (or follow) a sandbox's console log."),
    "version": ("matchlock.cli.version", "version", "Print matchlock's version."),
    "volume": ("matchlock.cli.volume", "volume", "Manage named volumes (persistent disks)."),
    "pool": ("matchlock.cli.pool", "pool", "Keep sandboxes of one configuration ready."),
    "rpc": ("matchlock.cli.rpc", "rpc", "Serve JSON-RPC on stdin/stdout (used by the SDKs)."),
    "allow-list": ("matchlock.cli.allow_list", "allow_list",
                   "Change a running sandbox's egress allow-list."),
    "port-forward": ("matchlock.cli.port_forward", "port_forward",
                     "Forward host ports to a running sandbox's guest ports."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = _COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module, attr, _ = entry
        mod = __import__(module, fromlist=[attr])
        cmd = getattr(mod, attr)
        assert isinstance(cmd, click.Command)
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, _, help_) in sorted(_COMMANDS.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="matchlock")
def cli() -> None:
    """Run untrusted workloads in ephemeral microVMs with host-controlled egress."""


def main(argv: list[str] | None = None) -> Any:
    signals.install()
    try:
        code = cli.main(args=argv, prog_name="matchlock", standalone_mode=False)
    except MatchlockError as e:
        click.echo(f"matchlock: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("matchlock: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code if e.exit_code else 2)
    except (KeyboardInterrupt, Interrupted):
        click.echo("matchlock: interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
