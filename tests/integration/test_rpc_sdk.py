"""The official Python SDK (PyPI `matchlock` 0.2.17, unchanged) against `matchlock rpc`.

The SDK has the same package name as this project, so it runs in a virtualenv of its own,
with its own interpreter, from a directory outside the repository and without PYTHONPATH: it
can never import this project's package (each script checks). The venv is
$MATCHLOCK_SDK_VENV, or `.sdk-venv` in the repository (scripts/bootstrap.sh makes it), or
one made for the session with pip.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import MATCHLOCK
from .rpc_util import wait_no_leftovers

pytestmark = pytest.mark.vm
Run = Callable[..., subprocess.CompletedProcess[bytes]]
SDK_VERSION = "0.2.17"
REPO = Path(__file__).resolve().parents[2]


def _sdk_ok(python: Path) -> bool:
    if not python.exists():
        return False
    r = subprocess.run([str(python), "-c", "import importlib.metadata as m; "
                        "print(m.version('matchlock'))"], capture_output=True, cwd="/",
                       env=_clean_env())
    return r.returncode == 0 and r.stdout.decode().strip() == SDK_VERSION


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.fixture(scope="session")
def sdk_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("MATCHLOCK_OFFICIAL_SDK_PYTHON")  # as tests/sdk take it
    if given and _sdk_ok(Path(given)):
        return Path(given)
    for venv in (os.environ.get("MATCHLOCK_SDK_VENV"), REPO / ".sdk-venv"):
        if venv and _sdk_ok(Path(venv) / "bin" / "python"):
            return Path(venv) / "bin" / "python"
    venv = tmp_path_factory.mktemp("sdk-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=_clean_env())
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q",
                        "--disable-pip-version-check", f"matchlock=={SDK_VERSION}"],
                       capture_output=True, env=_clean_env(), cwd="/")
    if r.returncode != 0:
        pytest.fail(f"cannot install the SDK matchlock=={SDK_VERSION}: {r.stderr.decode()}")
    assert _sdk_ok(venv / "bin" / "python")
    return venv / "bin" / "python"


PRELUDE = """
import base64, hashlib, io, json, os, sys, threading, time
import matchlock
from matchlock import Client, Sandbox, RPCError, MatchlockError
assert matchlock.__file__.startswith(os.environ["EXPECT_SDK_UNDER"]), matchlock.__file__
out = {}
def done():
    print(json.dumps(out))
"""


def sdk(python: Path, tmp_path: Path, script: str, timeout: float = 300) -> dict[str, Any]:
    """Run `script` with the SDK's interpreter; it fills `out`, printed as JSON. The
    official SDK must come from its own venv; this project's SDK (python = this
    interpreter) from this repository."""
    path = tmp_path / "scenario.py"
    path.write_text(PRELUDE + textwrap.dedent(script) + "\ndone()\n")
    env = _clean_env()
    env["MATCHLOCK_BIN"] = MATCHLOCK
    ours = python == Path(sys.executable)
    env["EXPECT_SDK_UNDER"] = str(REPO / "src") if ours else str(python.parents[1])
    r = subprocess.run([str(python), str(path)], capture_output=True, cwd=tmp_path, env=env,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr.decode()
    result: dict[str, Any] = json.loads(r.stdout.decode().splitlines()[-1])
    return result


@pytest.mark.parametrize("which", ["official", "ours"])
def test_sdk_end_to_end(sdk_python: Path, tmp_path: Path, ml: Run, state_dir: Path,
                        which: str) -> None:
    """The official SDK, and this project's own (`matchlock.sdk`), against the server."""
    python = sdk_python if which == "official" else Path(sys.executable)
    out = sdk(python, tmp_path, """
    c = Client()
    c.start()
    vm = c.launch(Sandbox("matchlock-builtin:busybox").with_env("GREETING", "hi there"))
    out["vm"] = vm
    out["ls_running"] = os.popen(os.environ["MATCHLOCK_BIN"] + " ls --json").read()

    r = c.exec("echo $GREETING; echo oops >&2; pwd; exit 3", working_dir="/tmp")
    out["exec"] = [r.exit_code, r.stdout, r.stderr]

    class Stamped(io.StringIO):
        def __init__(self):
            super().__init__()
            self.at = []
        def write(self, s):
            self.at.append((time.monotonic(), s))
            return super().write(s)
    so, se = Stamped(), Stamped()
    t0 = time.monotonic()
    r = c.exec_stream("for i in 1 2 3; do echo $i; sleep 0.4; done; echo e >&2", stdout=so,
                      stderr=se)
    out["stream"] = [r.exit_code, so.getvalue(), se.getvalue(),
                     [round(t - t0, 3) for t, _ in so.at]]

    data = os.urandom(1 << 20)
    po = io.StringIO()
    r = c.exec_pipe("tee /tmp/in.bin | sha256sum; wc -c < /tmp/in.bin",
                    stdin=io.BytesIO(data), stdout=po)
    out["pipe"] = [r.exit_code, po.getvalue(), hashlib.sha256(data).hexdigest()]
    po = io.StringIO()
    r = c.exec_pipe("cat", stdin=io.StringIO("line one\\nline two\\n"), stdout=po)
    out["pipe_text"] = [r.exit_code, po.getvalue()]

    to = io.StringIO()
    r = c.exec_interactive("stty size; tty; read x; echo got:$x; exit 5",
                           stdin=io.BytesIO(b"hello\\n"), stdout=to, rows=33, cols=77)
    out["tty"] = [r.exit_code, to.getvalue()]

    c.write_file("/workspace/blob.bin", data, mode=0o600)
    out["roundtrip"] = c.read_file("/workspace/blob.bin") == data
    c.write_file("/workspace/a.txt", "hi")
    out["files"] = sorted((f.name, f.size, f.mode, f.is_dir)
                          for f in c.list_files("/workspace"))
    out["stat"] = c.exec("stat -c '%a %s' /workspace/blob.bin").stdout
    try:
        c.read_file("/nope")
    except RPCError as e:
        out["read_err"] = [e.code, e.is_file_error()]
    try:
        c.exec("sleep 30", timeout=0.5)
    except TimeoutError as e:
        out["timeout"] = str(e)
    out["after_timeout"] = c.exec("echo alive").stdout
    c.close()
    out["ls_closed"] = os.popen(os.environ["MATCHLOCK_BIN"] + " ls --json").read()
    c.remove()
    out["ls_removed"] = os.popen(os.environ["MATCHLOCK_BIN"] + " ls --json").read()
    """)
    vm = out["vm"]
    assert [e["status"] for e in json.loads(out["ls_running"]) if e["id"] == vm] == ["running"]
    assert out["exec"] == [3, "hi there\n/tmp\n", "oops\n"]
    code, stdout, stderr, times = out["stream"]
    assert (code, stdout, stderr) == (0, "1\n2\n3\n", "e\n")
    # chunks arrive as produced, not at the end
    assert len(times) == 3 and times[1] - times[0] > 0.25 and times[2] - times[1] > 0.25
    code, text, digest = out["pipe"]
    assert code == 0 and text == f"{digest}  -\n1048576\n"
    assert out["pipe_text"] == [0, "line one\nline two\n"]
    code, screen = out["tty"]
    assert code == 5
    assert "33 77\r\n" in screen and "/dev/pts/" in screen and "got:hello\r\n" in screen
    assert out["roundtrip"] is True
    assert out["files"] == [["a.txt", 2, 0o644, False], ["blob.bin", 1 << 20, 0o600, False]]
    assert out["stat"] == "600 1048576\n"
    assert out["read_err"] == [-32002, True]
    assert "timed out after 0.5s" in out["timeout"]
    assert out["after_timeout"] == "alive\n"
    assert [e["status"] for e in json.loads(out["ls_closed"]) if e["id"] == vm] == ["stopped"]
    assert json.loads(out["ls_removed"]) == []
    assert wait_no_leftovers(state_dir) == []


def test_sdk_secrets_stay_placeholders(sdk_python: Path, tmp_path: Path, ml: Run,
                                       state_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the sandbox network needs root")
    out = sdk(sdk_python, tmp_path, """
    sb = (Sandbox("matchlock-builtin:busybox")
          .allow_host("api.example.test")
          .add_secret("API_KEY", "sk-real-value-0123456789", "api.example.test")
          .add_secret_with_placeholder("OTHER", "other-real-value-987", "PLACEHOLDER_OTHER_0123",
                                       "api.example.test")
          .add_host("db.example.test", "192.0.2.10"))
    with Client() as c:
        c.launch(sb)
        out["env"] = c.exec("env").stdout
        out["vals"] = c.exec("echo $API_KEY; echo $OTHER").stdout
        out["hosts"] = c.exec("cat /proc/cmdline; cat /etc/hosts").stdout
        # nothing of the host's state holds a value (the disk images are the guest's)
        found = []
        for root, _, names in os.walk(os.environ["MATCHLOCK_STATE_DIR"]):
            for name in names:
                path = os.path.join(root, name)
                if name.endswith(".ext4") or not os.path.isfile(path):
                    continue
                with open(path, "rb") as f:
                    data = f.read(64 << 20)
                if b"sk-real-value" in data or b"other-real-value" in data:
                    found.append(path)
        entry = json.loads(os.popen(os.environ["MATCHLOCK_BIN"] + " ls --json").read())[0]
        for what in ("environ", "cmdline"):
            with open(f"/proc/{entry['pid']}/{what}", "rb") as f:
                if b"real-value" in f.read():
                    found.append(what)
        out["found"] = found
    c.remove()
    """)
    key, other = out["vals"].splitlines()
    assert key.startswith("SANDBOX_SECRET_") and key != "sk-real-value-0123456789"
    assert other == "PLACEHOLDER_OTHER_0123"
    for value in ("sk-real-value-0123456789", "other-real-value-987"):
        assert value not in out["env"] and value not in out["hosts"]
    assert out["found"] == []
    assert wait_no_leftovers(state_dir) == []


def test_sdk_errors(sdk_python: Path, tmp_path: Path, ml: Run, state_dir: Path) -> None:
    out = sdk(sdk_python, tmp_path, """
    from matchlock import VFSInterceptionConfig, VFSHookRule
    c = Client()
    c.start()
    try:
        c.exec("true")
    except RPCError as e:
        out["before"] = [e.code, e.message]
    sb = (Sandbox("matchlock-builtin:busybox").with_workspace("/workspace")
          .mount_memory("/workspace")
          .with_vfs_interception(VFSInterceptionConfig(rules=[
              VFSHookRule(ops=["write"], path="/workspace/*", action="block")])))
    try:
        c.launch(sb)
    except RPCError as e:
        out["vfs"] = [e.code, e.message]
    try:
        c.launch(Sandbox("no-such-image-here:1"))
    except RPCError as e:
        out["image"] = [e.code, e.message]
    c.close()
    """)
    assert out["before"] == [-32000, "VM not created"]
    code, message = out["vfs"]
    assert code == -32602 and message.startswith("vfs.interception is not supported")
    assert out["image"][0] == -32000 and "no-such-image-here" in out["image"][1]
    assert wait_no_leftovers(state_dir) == []


def test_sdk_memory_and_host_mounts(sdk_python: Path, tmp_path: Path, ml: Run,
                                    state_dir: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "in.txt").write_text("from host\n")
    out = sdk(sdk_python, tmp_path, f"""
    sb = (Sandbox("matchlock-builtin:busybox").with_workspace("/workspace")
          .mount_host_dir("/workspace/src", {str(shared)!r})
          .mount_memory("/workspace/scratch").with_user("1000:1000"))
    with Client() as c:
        c.launch(sb)
        out["read"] = c.read_file("/workspace/src/in.txt").decode()
        c.write_file("/workspace/src/out.txt", b"from guest\\n")
        r = c.exec("id -u; echo mine > /workspace/scratch/by-user.txt; "
                   "cat /workspace/scratch/by-user.txt")
        out["user"] = [r.exit_code, r.stdout, r.stderr]
        out["ls"] = sorted(f.name for f in c.list_files("/workspace"))
    c.remove()
    """)
    assert out["read"] == "from host\n"
    assert (shared / "out.txt").read_text() == "from guest\n"
    assert out["ls"] == ["scratch", "src"]
    assert out["user"] == [0, "1000\nmine\n", ""]  # the memory mount belongs to the user
    assert wait_no_leftovers(state_dir) == []


def test_sdk_ctrl_c_then_close_and_remove(sdk_python: Path, tmp_path: Path, ml: Run,
                                          state_dir: Path) -> None:
    """Ctrl-C in the SDK's terminal (SIGINT to its whole process group, `matchlock rpc`
    included) interrupts the script; its cleanup still works."""
    path = tmp_path / "scenario.py"
    path.write_text(PRELUDE + textwrap.dedent("""
    c = Client()
    c.start()
    c.launch(Sandbox("matchlock-builtin:busybox"))
    print("ready", flush=True)
    try:
        c.exec("sleep 30")
    except KeyboardInterrupt:
        out["interrupted"] = True
        time.sleep(1)  # the script's own handling takes a while
    out["still_works"] = c.exec("echo yes").stdout
    c.close(timeout=5)
    c.remove()
    out["ls"] = os.popen(os.environ["MATCHLOCK_BIN"] + " ls --json").read()
    done()
    """))
    env = _clean_env()
    env.update(MATCHLOCK_BIN=MATCHLOCK, EXPECT_SDK_UNDER=str(sdk_python.parents[1]))
    proc = subprocess.Popen([str(sdk_python), str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path, env=env,
                            start_new_session=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr.decode()
    out = json.loads(stdout.decode().splitlines()[-1])
    assert out["interrupted"] is True and json.loads(out["ls"]) == []
    assert out["still_works"] == "yes\n"
    assert wait_no_leftovers(state_dir) == []


def test_sdk_volumes(sdk_python: Path, tmp_path: Path, ml: Run, state_dir: Path) -> None:
    """The SDK's volume calls shell out to `matchlock volume … --json`."""
    out = sdk(sdk_python, tmp_path, """
    c = Client()
    v = c.volume_create("sdkvol", 16)
    out["created"] = [v.name, v.size, os.path.isfile(v.path)]
    out["listed"] = [x.name for x in c.volume_list()]
    c.volume_remove("sdkvol")
    out["after"] = [x.name for x in c.volume_list()]
    """)
    assert out["created"] == ["sdkvol", "16.0 MB", True]
    assert out["listed"] == ["sdkvol"] and out["after"] == []
