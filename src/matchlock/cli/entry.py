"""The `matchlock` executable. `exec` on a running sandbox goes through `cli/fastexec.py`,
which imports neither click nor the sandbox machinery, the common forms of `run` through
`cli/fastrun.py` (no click), and `--version` is answered here; everything else is the click
application in `cli/main.py`. What these paths may import is guarded by
tests/unit/test_cli_imports.py."""

from __future__ import annotations

import os  # loaded by Python's own start-up: free
import sys


def main() -> None:
    try:
        _main()
    except KeyboardInterrupt:  # Ctrl-C while Python is still importing what it needs
        sys.stderr.write("matchlock: interrupted\n")
        sys.exit(130)


def _main() -> None:
    try:
        os.fstat(0), os.fstat(1), os.fstat(2)
    except OSError:
        from matchlock.sandbox.forked import fill_std_fds

        fill_std_fds()
    if sys.argv[1:] == ["--version"]:  # click's version_option prints the same line
        from matchlock import __version__

        sys.stdout.write(f"matchlock, version {__version__}\n")
        sys.exit(0)
    if sys.argv[1:2] == ["exec"]:
        from matchlock.cli import fastexec
        from matchlock.errors import MatchlockError

        try:
            code = fastexec.run(sys.argv[2:])
        except MatchlockError as e:
            sys.stderr.write(f"matchlock: {e}\n")
            sys.exit(e.exit_code)
        if code is not None:
            sys.exit(code)
    # click answers shell completion (the variable its `main` looks for) for every command.
    if sys.argv[1:2] == ["run"] and "_MATCHLOCK_COMPLETE" not in os.environ:
        from matchlock.cli import fastrun

        params = fastrun.parse(sys.argv[2:])
        if params is not None:
            # A terminal stays with this process (-t, or -i reading one: a fork outside the
            # terminal's job control would go on reading it after a Ctrl-Z), and a
            # supervisor (run -d's own process) runs its sandbox itself.
            if (not params["tty"] and not (params["interactive"] and os.isatty(0))
                    and "MATCHLOCK_SUPERVISOR" not in os.environ
                    and os.environ.get("MATCHLOCK_FORKSERVER", "1") != "0"):
                from matchlock.cli import forkclient

                if not forkclient.served:
                    code = forkclient.run(sys.argv)
                    if code is not None:
                        sys.exit(code)
            fastrun.run(params)  # exits
    from matchlock.cli.main import main as click_main

    click_main()
