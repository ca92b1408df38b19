"""`matchlock run` without click: a reader of the common argument forms, with click's exact
reading (tests/unit/test_fastexec.py compares the two), and the same handling of errors and
Ctrl-C as cli/main.py.

click and its command objects cost ~10 ms of every `run` (docs/performance.md, "CLI
overhead"). Like cli/fastexec.py, the reader takes only what it fully understands; for
anything else (`--help`, an unknown flag, a missing or bad value, `--pool`) it steps aside and
the click command gives the usual help or one-line error.
"""

from __future__ import annotations

import sys

from matchlock.errors import MatchlockError

# Option -> (parameter, value): the boolean flags of the click command.
_FLAGS = {
    "--pull": ("pull", True), "-i": ("interactive", True), "--interactive": ("interactive", True),
    "-t": ("tty", True), "--tty": ("tty", True), "-d": ("detach", True),
    "--detach": ("detach", True), "--privileged": ("privileged", True), "--rm": ("rm", True),
    "--no-rm": ("rm", False), "--no-network": ("no_network", True),
    "--log-network": ("log_network", True),
}
# Option -> parameter, for the options that take a value (no --pool: the click command's).
_VALUES = {
    "--image": "image", "-e": "envs", "--env": "envs", "--env-file": "env_files",
    "-w": "workdir", "--workdir": "workdir", "-u": "user", "--user": "user",
    "--entrypoint": "entrypoint", "--cpus": "cpus", "--memory": "memory",
    "--disk-size": "disk_size", "--timeout": "timeout", "--hostname": "hostname",
    "--allow-host": "allow_hosts", "--secret": "secret_specs", "--secret-file": "secret_files",
    "--add-host": "add_hosts", "--allow-private-host": "allow_private",
    "--upstream-ca": "upstream_ca", "--upstream-dns": "upstream_dns",
    "--max-connections": "max_connections", "--accel": "accel", "--workspace": "workspace",
    "-v": "volumes", "--volume": "volumes", "--disk": "disk_specs", "-p": "publish",
    "--publish": "publish", "--address": "publish_address", "--pool-member": "pool_member",
}
_MULTIPLE = {"envs", "env_files", "allow_hosts", "secret_specs", "secret_files", "add_hosts",
             "allow_private", "upstream_dns", "volumes", "disk_specs", "publish",
             "publish_address"}
_DEFAULTS: dict[str, object] = {
    "image": None, "pull": False, "workdir": None, "user": None, "entrypoint": None,
    "cpus": "1", "memory": "512", "disk_size": "5120", "timeout": None, "hostname": None,
    "interactive": False, "tty": False, "detach": False, "privileged": False, "rm": True,
    "no_network": False, "upstream_ca": None, "log_network": False, "max_connections": None,
    "accel": None, "workspace": None, "pool_member": None,
}


_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def rewrite_rm(args: list[str], takes_value: set[str]) -> list[str]:
    """The reference's spelling `--rm=false` / `--rm=true` (a click boolean flag takes no
    value) as `--no-rm` / `--rm`, in the options only (up to the first argument or `--`, a
    value after an option of `takes_value` skipped): the command's own arguments are never
    touched."""
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
    return out


def _convert(param: str, value: str) -> object:
    """click's conversion of the typed options (ValueError where click fails)."""
    if param == "timeout":
        return float(value)  # click.FLOAT
    if param == "max_connections":
        n = int(value)  # click.IntRange(min=1)
        if n < 1:
            raise ValueError(value)
        return n
    return value


def parse(args: list[str]) -> dict[str, object] | None:
    """The click command's parameters for `run ARGS` (but `pool`), or None for anything this
    reader does not handle."""
    try:
        args = rewrite_rm(args, {*_VALUES, "--pool"})
    except MatchlockError:
        return None
    params = dict(_DEFAULTS)
    multi: dict[str, list[str]] = {m: [] for m in _MULTIPLE}
    given: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            i += 1
            break
        if not a.startswith("-") or a == "-":
            break  # allow_interspersed_args=False: the command starts here
        if a.startswith("--"):
            name, eq, inline = a.partition("=")
            if name in _FLAGS and not eq:
                params[_FLAGS[name][0]] = _FLAGS[name][1]
                i += 1
            elif name in _VALUES and eq:
                given.append((_VALUES[name], inline))
                i += 1
            elif name in _VALUES and i + 1 < len(args):
                given.append((_VALUES[name], args[i + 1]))
                i += 2
            else:
                return None
            continue
        # A cluster of short options (-it, -itd, -ie A=1, -eA=1, -w/dir): flags, then perhaps
        # one option that takes the rest of the word, or else the next word, as its value.
        # click reads `-e=X` so too: the value is "=X".
        for j in range(1, len(a)):
            opt = "-" + a[j]
            if opt in _FLAGS:
                params[_FLAGS[opt][0]] = _FLAGS[opt][1]
                continue
            if opt not in _VALUES:
                return None
            if j + 1 < len(a):
                given.append((_VALUES[opt], a[j + 1:]))
            elif i + 1 < len(args):
                i += 1
                given.append((_VALUES[opt], args[i]))
            else:
                return None
            break
        i += 1
    for param, value in given:
        if param in _MULTIPLE:
            multi[param].append(value)
            continue
        try:
            params[param] = _convert(param, value)
        except ValueError:
            return None
    for param, values in multi.items():
        params[param] = tuple(values)
    params["command"] = tuple(args[i:])
    return params


class _Pacified:
    """As click does after EPIPE: a final flush on the broken pipe stays quiet."""

    def __init__(self, wrapped: object) -> None:
        self.wrapped = wrapped

    def flush(self) -> None:
        try:
            self.wrapped.flush()  # type: ignore[attr-defined]
        except BrokenPipeError:
            return

    def __getattr__(self, attr: str) -> object:
        return getattr(self.wrapped, attr)


def _say(line: str) -> None:
    if "\x1b" in line:  # click.echo strips escape sequences off a non-terminal: let it
        import click

        click.echo(line, err=True)
        return
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run(params: dict[str, object]) -> None:
    """cli/main.py's `main` for these parameters (never returns)."""
    from matchlock.cli import signals
    from matchlock.cli.runbody import execute

    signals.install()
    try:
        execute(**params)  # type: ignore[arg-type]
    except MatchlockError as e:
        _say(f"matchlock: {e}")
        sys.exit(e.exit_code)
    except (EOFError, KeyboardInterrupt):  # click: a blank line, then Abort
        _say("")
        _say("matchlock: aborted")
        sys.exit(130)
    except signals.Interrupted:
        _say("matchlock: interrupted")
        sys.exit(130)
    except OSError as e:
        import errno

        if e.errno != errno.EPIPE:
            raise
        sys.stdout = _Pacified(sys.stdout)
        sys.stderr = _Pacified(sys.stderr)
        sys.exit(1)
    sys.exit(0)
