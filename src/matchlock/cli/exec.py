"""`matchlock exec`: run a command in a detached sandbox, through its supervisor's socket.

`cli/entry.py` runs most calls without click (see `cli/fastexec.py`); this command handles
the rest (help, errors, anything the fast path does not take) with the same checks."""

from __future__ import annotations

import sys

import click

from matchlock.errors import MatchlockError


@click.command(context_settings={"allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True, help="Forward stdin to the command.")
@click.option("-t", "--tty", is_flag=True, help="Run the command on a pseudo-terminal.")
@click.option("-w", "--workdir", default=None, help="Working directory in the guest.")
@click.option("-u", "--user", default=None, help="uid, uid:gid, or user name from the image.")
@click.option("-e", "--env", "envs", multiple=True, help="KEY=VALUE, or KEY to copy from the host.")
@click.argument("sandbox_id")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(interactive: bool, tty: bool, workdir: str | None, user: str | None,
          envs: tuple[str, ...], sandbox_id: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in the running sandbox SANDBOX_ID (started with `run -d`)."""
    from matchlock.cli.fastexec import ExecArgs, checked_env
    from matchlock.sandbox.control import connect
    from matchlock.sandbox.exec_client import run_exec

    if command[:1] == ("--",):
        command = command[1:]  # click keeps the `--` that follows a positional argument
    if not command:
        raise MatchlockError("no command given", hint="matchlock exec ID -- CMD")
    args = ExecArgs(sandbox_id, list(command), list(envs), workdir, user, interactive, tty)
    env = checked_env(args)
    sys.exit(run_exec(connect(sandbox_id), args.argv, env, workdir, user, interactive, tty))
