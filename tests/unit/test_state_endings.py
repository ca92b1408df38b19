"""End reasons from exit codes, errors, supervisor reasons and (hostile) console lines."""

from __future__ import annotations

from matchlock.state import endings as en

OOM_LINE = ("[   12.345678] Out of memory: Killed process 77 (python3) total-vm:300000kB, "
            "anon-rss:120000kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:400kB oom_score_adj:0")
NONE = en.ConsoleFindings()


def test_console_scan() -> None:
    f = en.scan_console(["noise", OOM_LINE])
    assert f.oom_kills == ("python3 (pid 77)",) and f.panic is None
    p = en.scan_console(["[ 1.0] Kernel panic - not syncing: Attempted to kill init!"])
    assert p.panic == "Attempted to kill init!"
    # Guest text: escape sequences and floods never reach the record as they are.
    evil = en.scan_console(["Kernel panic - not syncing: \x1b]0;pwn\x07" + "A" * 5000])
    assert evil.panic is not None and "\x1b" not in evil.panic
    assert len(evil.panic) <= en.MAX_DETAIL
    assert len(en.scan_console([OOM_LINE] * 100).oom_kills) == 8


def test_exit_codes() -> None:
    assert en.from_exit(0, NONE) == en.Ending("exit", "the command exited with code 0", 0)
    assert en.from_exit(3, NONE).reason == "exit"
    assert en.from_exit(255, NONE).reason == "exit"
    e = en.from_exit(143, NONE)
    assert (e.reason, e.detail) == ("signal", "the command was killed by SIGTERM")
    oom = en.from_exit(137, en.scan_console([OOM_LINE]))
    assert oom.reason == "oom" and "python3 (pid 77)" in oom.detail and oom.exit_code == 137
    # The OOM killer took a child; the command itself exited: both are said.
    partial = en.from_exit(1, en.scan_console([OOM_LINE]))
    assert partial.reason == "exit" and "OOM killer killed python3" in partial.detail
    # A plain SIGKILL without OOM evidence is a signal.
    assert en.from_exit(137, NONE).reason == "signal"


def test_errors() -> None:
    assert en.from_error("timed out after 3s; the sandbox was killed", 124, NONE).reason == \
        "timeout"
    # 124 from the command itself is an exit code, not a timeout: it is not an error at all.
    assert en.from_exit(124, NONE).reason == "exit"
    i = en.from_error("interrupted", 130, NONE)
    assert (i.reason, i.detail) == ("interrupted", "matchlock received SIGINT")
    k = en.from_error("stopped by SIGTERM", 143, NONE, kill_requested=True)
    assert k.reason == "kill"
    p = en.from_error("lost the guest agent", 1, en.scan_console(["Kernel panic - not syncing: x"]))
    assert p.reason == "panic"
    assert en.from_error("the VM exited unexpectedly (status 1)", 1, NONE).reason == "error"


def test_supervisor_reasons() -> None:
    assert en.from_supervisor("kill", NONE).reason == "kill"
    assert en.from_supervisor("timed out after 3s", NONE) == en.Ending(
        "timeout", "timed out after 3s", None)
    s = en.from_supervisor("stopped by SIGTERM", NONE)
    assert (s.reason, s.detail) == ("interrupted", "its supervisor received SIGTERM")
    assert en.owner_crash(42).reason == "owner-crash"
    assert en.from_supervisor("closed", NONE).reason == "closed"
    rpc = en.from_supervisor("timed out after 5s (resources.timeout_seconds)", NONE)
    assert rpc.reason == "timeout"


def test_kill_of_a_run_whose_command_ended_on_the_signal() -> None:
    e = en.from_exit(143, NONE, kill_requested=True)
    assert e.reason == "kill" and "SIGTERM" in e.detail and e.exit_code == 143


def test_a_supervisor_stopped_while_booting() -> None:
    e = en.from_error("the sandbox was stopped: timed out after 1s", 1, NONE)
    assert (e.reason, e.detail) == ("timeout", "timed out after 1s")
    e = en.from_error("the sandbox was stopped: stopped by SIGTERM", 1, NONE)
    assert e.reason == "interrupted"
    assert en.from_error("the sandbox was stopped: stopped by SIGTERM", 1, NONE,
                         kill_requested=True).reason == "kill"
