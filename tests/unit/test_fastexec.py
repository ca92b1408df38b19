"""The click-free `exec` parser must read every argument list it accepts exactly as the click
command does (it steps aside for the rest)."""

from __future__ import annotations

from typing import Any

import click
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from matchlock.cli.exec import exec_
from matchlock.cli.fastexec import ExecArgs, parse


def click_reading(args: list[str]) -> ExecArgs | None:
    seen: dict[str, Any] = {}

    def capture(**kw: Any) -> None:
        seen.update(kw)

    cmd = click.Command("exec", params=exec_.params, callback=capture,
                        context_settings={"allow_interspersed_args": False})
    try:
        cmd.main(args=args, standalone_mode=False)
    except click.ClickException:
        return None
    command = list(seen["command"])
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        return None
    return ExecArgs(seen["sandbox_id"], command, list(seen["envs"]), seen["workdir"],
                    seen["user"], seen["interactive"], seen["tty"])


@pytest.mark.parametrize("args", [
    ["vm-1", "--", "true"],
    ["vm-1", "true"],
    ["-it", "vm-1", "--", "sh"],
    ["-ti", "vm-1", "sh"],
    ["-i", "-t", "-w", "/tmp", "-u", "1000:1000", "-e", "A=1", "-e", "B", "vm-1", "--", "id"],
    ["--workdir=/w", "--user", "nobody", "--env=X=y=z", "vm-1", "ls", "-la", "--", "-x"],
    ["-w/tmp", "-eA=1", "vm-1", "--", "env"],
    ["-iw", "/tmp", "vm-1", "pwd"],
    ["-iw/tmp", "vm-1", "pwd"],
    ["--", "vm-1", "--", "true"],
    ["vm-1", "--", "--", "x"],
    ["vm-1", "sh", "-c", "exit 3"],
])
def test_same_reading_as_click(args: list[str]) -> None:
    got = parse(args)
    assert got is not None
    assert got == click_reading(args)


@pytest.mark.parametrize("args", [
    [], ["vm-1"], ["vm-1", "--"], ["--help"], ["-h", "vm-1", "true"], ["-x", "vm-1", "true"],
    ["-w"], ["-it"], ["--tty=1", "vm-1", "true"], ["-iq", "vm-1", "true"], ["--bogus", "vm-1", "x"],
])
def test_steps_aside(args: list[str]) -> None:
    assert parse(args) is None


WORDS = st.sampled_from(["-i", "-t", "-it", "-ti", "-w", "-u", "-e", "--workdir", "--user",
                         "--env", "--tty", "--interactive", "--", "-", "vm-1", "true", "/tmp",
                         "A=1", "-w/x", "-eK=V", "--env=A=B", "-x", "--help", "sh", "-c",
                         "--workdir=/d", "-iw", "-iu", "-ie", "-tiu0", "-h"])


@settings(max_examples=2000, deadline=None)
@given(st.lists(WORDS, max_size=9))
def test_fuzz_never_disagrees_with_click(args: list[str]) -> None:
    got = parse(args)
    if got is not None:
        assert got == click_reading(args), args


@pytest.mark.parametrize("entry", ["BAD NAME=hunter2-secret", "=hunter2-secret",
                                   "A=hunter2-secret\0"])
def test_env_errors_never_quote_the_value(entry: str) -> None:
    from matchlock.errors import MatchlockError
    from matchlock.sandbox.envspec import parse_env_entry

    with pytest.raises(MatchlockError) as e:
        parse_env_entry(entry, "-e")
    assert "hunter2" not in str(e.value)
