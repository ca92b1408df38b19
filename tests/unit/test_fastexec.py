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


# `run`: the click-free reader (cli/fastrun.py) against the click command itself.

def click_run_reading(args: list[str]) -> dict[str, object] | None:
    from matchlock.cli.run import _RunCommand, run
    from matchlock.errors import MatchlockError

    seen: dict[str, Any] = {}

    def capture(**kw: Any) -> None:
        seen.update(kw)

    cmd = _RunCommand("run", params=run.params, callback=capture,
                      context_settings={"allow_interspersed_args": False})
    try:
        cmd.main(args=args, standalone_mode=False)
    except (click.ClickException, MatchlockError):
        return None
    if seen.pop("pool") is not None:
        return None
    return seen


RUN_CASES = [
    [], ["true"], ["--", "true"], ["--no-network", "--", "true"],
    ["-it", "--", "sh"], ["-itd"], ["-d", "--rm=false"], ["--rm=FALSE", "--", "x", "--rm=true"],
    ["--rm=yes", "--no-rm", "--rm", "true"], ["-e", "A=1", "-eB=2", "--env=C=3", "--env", "D",
                                              "-e=E", "--", "env"],
    ["-ie", "A=1", "true"], ["-iw/tmp", "pwd"], ["-tiu0", "id"], ["-w", "/w", "-u", "1000:1000"],
    ["--image", "alpine:3", "--pull", "--entrypoint", "", "--cpus=0.5", "--memory", "1g",
     "--disk-size=10g", "--timeout", "2.5", "--hostname", "h", "--privileged", "--accel=tcg"],
    ["--timeout=inf", "--max-connections", "7", "--log-network", "--upstream-ca", "/ca.pem",
     "--upstream-dns", "1.1.1.1", "--upstream-dns=9.9.9.9:53"],
    ["--allow-host", "*.x.com", "--allow-host=y.com:8443", "--secret", "K@x.com",
     "--secret-file", "K=/f@x.com", "--add-host", "h:10.0.0.1", "--allow-private-host", "h"],
    ["--workspace", "/ws", "-v", "/a:/b", "--volume=/c:/d:ro", "-v/e:/f", "--disk", "@v:/data",
     "--disk=img.ext4:/m:ro", "-p", "8080", "-p8081:80", "--publish=9000", "--address",
     "0.0.0.0", "--address=::1,127.0.0.1"],
    ["-d", "--pool-member", "p1"], ["--env-file", "f", "--env-file=g", "true"],
    ["-", "x"], ["", "x"], ["--", "--", "x"], ["-e", "--rm=false", "x"], ["-ie", "--rm=false"],
    ["true", "--no-network", "-e", "A=1"],
]


@pytest.mark.parametrize("args", RUN_CASES)
def test_run_same_reading_as_click(args: list[str]) -> None:
    from matchlock.cli.fastrun import parse as parse_run

    got = parse_run(args)
    assert got is not None
    assert got == click_run_reading(args)


@pytest.mark.parametrize("args", [
    ["--help"], ["-h"], ["-ih"], ["--bogus"], ["-x", "true"], ["-e"], ["--env"], ["-ie"],
    ["--rm=maybe", "true"], ["--no-network=1"], ["--timeout", "soon"], ["--timeout=x"],
    ["--max-connections", "0"], ["--max-connections=1.5"], ["-d", "--pool", "p"],
    ["-d", "--pool=p"], ["--imag", "x"],
])
def test_run_steps_aside(args: list[str]) -> None:
    from matchlock.cli.fastrun import parse as parse_run

    assert parse_run(args) is None


RUN_WORDS = st.sampled_from([
    "--", "-", "", "true", "sh", "-c", "A=1", "/tmp", "x:y", "1", "0", "-1", "2.5", "1e3",
    "--image", "--pull", "-e", "--env", "--env-file", "-w", "--workdir", "-u", "--user",
    "--entrypoint", "--cpus", "--memory", "--disk-size", "--timeout", "--hostname", "-i",
    "--interactive", "-t", "--tty", "-d", "--detach", "--privileged", "--rm", "--no-rm",
    "--no-network", "--allow-host", "--secret", "--secret-file", "--add-host",
    "--allow-private-host", "--upstream-ca", "--upstream-dns", "--log-network",
    "--max-connections", "--accel", "--workspace", "-v", "--volume", "--disk", "-p",
    "--publish", "--address", "--pool", "--pool-member", "--help", "-h",
    "--rm=false", "--rm=True", "--rm=0", "--rm=x", "--tty=1", "--env=K=V", "--timeout=3",
    "--max-connections=2", "--image=", "-it", "-itd", "-ie", "-iw", "-eK=V", "-e=K", "-w/d",
    "-v/a:/b", "-p80", "-tiu0", "-id", "-ix", "-dh", "-vp", "--imag", "--no-network=",
])


@settings(max_examples=3000, deadline=None)
@given(st.lists(RUN_WORDS, max_size=10))
def test_run_fuzz_never_disagrees_with_click(args: list[str]) -> None:
    from matchlock.cli.fastrun import parse as parse_run

    got = parse_run(args)
    if got is not None:
        assert got == click_run_reading(args), args
