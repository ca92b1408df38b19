"""What a fresh `matchlock` process imports on its hot paths (issues 7 and 10).

An agent runs `matchlock exec` for every tool call: its fixed cost is Python start-up plus
imports, and each heavy module costs milliseconds (docs/performance.md, "CLI process
overhead"). These tests run the real paths in a fresh interpreter (the exec against a fake
supervisor socket) and fail when a named heavy module shows up that the bare interpreter had
not already loaded.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest

from matchlock.sandbox import wire

ROOT = Path(__file__).resolve().parents[2]
# Loaded by a bare interpreter here or not, these must never be what our paths add.
HEAVY = {"ssl", "_ssl", "cryptography", "h2", "h11", "httpx", "httpcore", "rich", "uvloop",
         "asyncio", "dns", "zstandard", "sqlite3", "click"}
# The exec and --version paths also go without the stdlib's slower pure-Python modules.
STDLIB_SLOW = {"typing", "re", "json", "enum", "socket", "selectors", "signal", "threading",
               "pathlib", "contextlib", "dataclasses", "inspect", "collections", "functools",
               "platform", "subprocess", "tempfile", "shutil"}
HEAVY_PACKAGES = ("matchlock.net", "matchlock.image", "matchlock.state", "matchlock.guest",
                  "matchlock.vm", "matchlock.rpc", "matchlock.sdk")
REGISTRY = {"matchlock.image.registry", "matchlock.image.pull", "matchlock.image.download",
            "matchlock.image.auth", "matchlock.image.progress"}
TLS_STACK = {"matchlock.net.proxy", "matchlock.net.certs", "matchlock.net.stack",
             "matchlock.net.dns", "matchlock.net.upstream", "matchlock.net.h2relay"}

_DUMP = """
import os, sys
try:
{body}
finally:
    with open(os.environ["MODULES_OUT"], "w") as f:
        f.write("\\n".join(sorted(sys.modules)))
"""


def _modules(tmp_path: Path, body: str, env: dict[str, str] | None = None,
             stdin: int | None = None) -> tuple[set[str], subprocess.CompletedProcess[bytes]]:
    out = tmp_path / "modules.txt"
    code = _DUMP.format(body="\n".join("    " + line for line in body.splitlines()))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                       stdin=stdin, env={**os.environ, **(env or {}), "MODULES_OUT": str(out)})
    return set(out.read_text().split()), r


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """What this interpreter loads before running any of our code (site, .pth files)."""
    mods, r = _modules(tmp_path_factory.mktemp("bare"), "pass")
    assert r.returncode == 0, r.stderr
    return mods


def _added(mods: set[str], bare: set[str]) -> set[str]:
    return mods - bare


class FakeSupervisor:
    """A control socket that answers one exec: output, then an exit code."""

    def __init__(self, home: Path, sid: str) -> None:
        d = home / "sandboxes" / sid
        d.mkdir(parents=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(d / "control.sock"))
        self.sock.listen(1)
        self.request: dict[str, object] | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        dec = wire.Decoder()
        frames: list[wire.Frame] = []
        while not frames:
            frames = dec.feed(conn.recv(65536))
        assert frames[0].type == wire.REQUEST
        self.request = json.loads(frames[0].payload)
        conn.sendall(wire.encode(wire.STDOUT, b"out \xff\n") + wire.encode(wire.STDERR, b"err\n")
                     + wire.encode(wire.EXIT, b'{"code": 7}'))
        conn.close()


def test_exec_fast_path_imports_nothing_heavy(tmp_path: Path, bare: set[str]) -> None:
    sup = FakeSupervisor(tmp_path, "vm-fake")
    mods, r = _modules(tmp_path, "sys.argv = ['matchlock', 'exec', '-e', 'A=\\u00e9', "
                       "'vm-fake', '--', 'sh', '-c', 'x']\n"
                       "from matchlock.cli.entry import main\nmain()",
                       env={"MATCHLOCK_STATE_DIR": str(tmp_path)}, stdin=subprocess.DEVNULL)
    sup.thread.join(10)
    # The exec really went through the fast path, with the exact request and answer.
    assert (r.returncode, r.stdout, r.stderr) == (7, b"out \xff\n", b"err\n"), r.stderr.decode()
    assert sup.request == {"op": "exec", "argv": ["sh", "-c", "x"], "env": ["A=\u00e9"],
                           "workdir": None, "user": None, "stdin": False, "tty": False,
                           "rows": 24, "cols": 80}
    added = _added(mods, bare)
    assert added & (HEAVY | STDLIB_SLOW) == set()
    assert {m for m in added if m.startswith(HEAVY_PACKAGES)} == set()
    assert {m for m in added if m.startswith("matchlock.cli.")} == {
        "matchlock.cli.entry", "matchlock.cli.fastexec"}


def test_version_imports_nothing_heavy(tmp_path: Path, bare: set[str]) -> None:
    mods, r = _modules(tmp_path, "sys.argv = ['matchlock', '--version']\n"
                       "from matchlock.cli.entry import main\nmain()")
    assert (r.returncode, r.stdout) == (0, b"matchlock, version 0.1.0\n")
    added = _added(mods, bare)
    assert added & (HEAVY | STDLIB_SLOW) == set()
    assert {m for m in added if m.startswith("matchlock.")} == {
        "matchlock.cli", "matchlock.cli.entry"}


def _importtime(argv: list[str]) -> tuple[set[str], subprocess.CompletedProcess[bytes]]:
    r = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True,
                       timeout=60)
    lines = r.stderr.decode().splitlines()
    return {ln.rsplit("|", 1)[1].strip() for ln in lines if ln.startswith("import time:")}, r


def test_the_installed_executable_is_the_plain_launcher() -> None:
    # pip's script for a [project.scripts] entry point imports `re` before our code: the
    # executable is bin/matchlock instead (setuptools script-files), which adds nothing.
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert cfg["tool"]["setuptools"]["script-files"] == ["bin/matchlock"]
    assert "scripts" not in cfg["project"]
    launcher = ROOT / "bin" / "matchlock"
    assert launcher.read_text().startswith("#!python\n")
    bare, _ = _importtime(["-c", "pass"])
    mods, r = _importtime([str(launcher), "--version"])
    assert (r.returncode, r.stdout) == (0, b"matchlock, version 0.1.0\n")
    assert (mods - bare) & (HEAVY | STDLIB_SLOW) == set()


def test_version_line_is_click_s(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from matchlock.cli.main import cli

    assert CliRunner().invoke(cli, ["--version"]).output == "matchlock, version 0.1.0\n"


def test_run_modules_import_no_tls_or_registry(tmp_path: Path, bare: set[str]) -> None:
    # What `run --no-network` imports before it boots (cli/run.py's lazy imports).
    mods, r = _modules(tmp_path, "import matchlock.cli.main, matchlock.cli.run\n"
                       "import matchlock.image.resolve, matchlock.sandbox.attach\n"
                       "import matchlock.sandbox.core, matchlock.sandbox.boot\n"
                       "import matchlock.sandbox.mounts, matchlock.sandbox.network\n"
                       "import matchlock.sandbox.ports, matchlock.sandbox.disks\n"
                       "import matchlock.sandbox.supervisor")
    assert r.returncode == 0, r.stderr
    added = _added(mods, bare)
    assert added & (HEAVY - {"click", "sqlite3"}) == set()
    assert added & (REGISTRY | TLS_STACK) == set()


@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="needs busybox-static")
def test_resolving_a_stored_image_does_not_load_the_registry_client(tmp_path: Path,
                                                                    bare: set[str]) -> None:
    env = {"MATCHLOCK_STATE_DIR": str(tmp_path), "MATCHLOCK_CACHE_DIR": str(tmp_path / "cache")}
    body = ("from matchlock.image.resolve import resolve_image\n"
            "print(resolve_image({name!r}).name)")
    _, r = _modules(tmp_path, body.format(name=None), env)  # builds and stores it
    assert r.returncode == 0, r.stderr
    mods, r = _modules(tmp_path, body.format(name="matchlock-builtin:busybox"), env)
    assert (r.returncode, r.stdout) == (0, b"matchlock-builtin:busybox\n"), r.stderr
    added = _added(mods, bare)
    assert added & (HEAVY - {"sqlite3"}) == set()
    assert added & (REGISTRY | TLS_STACK) == set()
    # Its root filesystem is built: nothing of the unpacking either.
    assert added & {"matchlock.image.layers", "tarfile", "gzip"} == set()


@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="needs busybox-static")
def test_plain_run_no_network_imports_up_to_the_boot(tmp_path: Path, bare: set[str]) -> None:
    # `matchlock run --no-network -- true` on the stored built-in image, stopped where the
    # VM would boot: what it has imported by then, in-process (the fork server off, or not
    # reachable: test_forkserver.py has the client's side).
    env = {"MATCHLOCK_STATE_DIR": str(tmp_path), "MATCHLOCK_CACHE_DIR": str(tmp_path / "cache"),
           "MATCHLOCK_FORKSERVER": "0"}
    _, r = _modules(tmp_path, "from matchlock.image.resolve import resolve_image\n"
                    "resolve_image(None)", env)  # builds and stores it
    assert r.returncode == 0, r.stderr
    mods, r = _modules(tmp_path, "\n".join([
        "from matchlock.image import resolve",
        "from matchlock.sandbox import boot",
        "real = resolve.resolve_image",
        "def stop(*a, **kw):",
        "    print(real(*a, **kw).name)",
        "    raise SystemExit(0)",
        "resolve.resolve_image = stop",
        "boot.artifacts = lambda: None",
        "sys.argv = ['matchlock', 'run', '--no-network', '--', 'true']",
        "from matchlock.cli.entry import main",
        "main()",
    ]), env)
    assert (r.returncode, r.stdout) == (0, b"matchlock-builtin:busybox\n"), r.stderr
    added = _added(mods, bare)
    assert added & (HEAVY - {"sqlite3"}) == set()  # click too: cli/fastrun.py read the arguments
    assert {m for m in added if m.startswith("matchlock.cli.")} == {
        "matchlock.cli.entry", "matchlock.cli.fastrun", "matchlock.cli.runbody",
        "matchlock.cli.signals"}
    # No network: no concurrent.futures (nor the logging it brings) for an Egress.
    assert added & {"concurrent.futures", "logging"} == set()
    # What all of it comes to: 144 modules when this was written; the tree before the
    # click-free reader and the lazy concurrent.futures added 167. A new heavy dependency on
    # this path shows up as a jump.
    assert len(added) <= 150, sorted(added)
    assert added & (REGISTRY | TLS_STACK) == set()
    assert {m for m in added if m.startswith("matchlock.net.")} <= {"matchlock.net.limits"}
    # No -v, no --disk: nothing of mounts or disks; the image is built: no unpacker.
    assert added & {"matchlock.sandbox.mounts", "matchlock.sandbox.disks",
                    "matchlock.sandbox.volumes", "matchlock.image.layers", "tarfile"} == set()


@pytest.mark.parametrize("args", [
    ["--cpus", "abc", "--", "true"],
    ["-w", "rel", "true"],
    ["--timeout=-1", "true"],
    ["-d", "-it", "sh"],
    ["--no-network", "--allow-host", "x.com", "true"],
    ["-p", "nope", "true"],
])
def test_run_fast_path_errors_are_click_s(tmp_path: Path, args: list[str]) -> None:
    # The same one line and exit code as the click command for errors found after the
    # arguments are read (the click-free reader takes these argument lists).
    from matchlock.cli.fastrun import parse

    assert parse(args) is not None
    env = {**os.environ, "MATCHLOCK_STATE_DIR": str(tmp_path),
           "MATCHLOCK_CACHE_DIR": str(tmp_path / "cache")}
    fast = subprocess.run([sys.executable, str(ROOT / "bin" / "matchlock"), "run", *args],
                          capture_output=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    slow = subprocess.run([sys.executable, "-m", "matchlock.cli.main", "run", *args],
                          capture_output=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert fast.stderr.startswith(b"matchlock: "), fast.stderr
    assert (fast.returncode, fast.stdout, fast.stderr) == (
        slow.returncode, slow.stdout, slow.stderr)
