"""Secret values on the host: given three ways (environment, inline, file), they reach the
upstream and nowhere else that matchlock writes.

Each run goes through the CLI as root with the default sealed network, a private state dir
and a private cache (the shared kernel, agent, initramfs and empty-disk artifacts are
symlinked in; images and snapshot templates are this module's own). Sandbox directories are
kept (MATCHLOCK_KEEP_SANDBOX) so their files can be searched, then removed by `matchlock gc`.
Every value is looked for raw, as hex and as base64 (at every alignment), in: the CLI's
stdout and stderr (with --log-network: the audit lines), everything under the state and
cache dirs, the environment and command line of every process the CLI started, and the
output of failed runs. The upstream's own log is the positive control: the values did flow.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from matchlock.paths import cache_dir
from tests import procs

from . import test_network
from .conftest import (
    MATCHLOCK,
    PYTHON_IMAGE,
    TESTDATA,
    db_file_bytes,
    new_owner,
    sandbox_owners,
)
from .test_network import Upstream

# The upstream namespace of the egress tests (module-scoped: set up again for this module).
upstream = test_network.upstream

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]

VALUES = {
    "ENV_TOKEN": "envval-" + secrets.token_hex(12),
    "INLINE_TOKEN": "inlineval-" + secrets.token_hex(12),
    "FILE_TOKEN": "fileval-" + secrets.token_hex(12),
}
SHARED = ("agent", "kernel", "initramfs", "upper")  # host artifacts, written before any run
HOSTS = "api.test,down.test"


def _b64_cores(raw: bytes) -> Iterator[bytes]:
    """The base64 characters that depend on `raw` alone, at each of the three alignments it
    can have inside a longer encoded string (`user:VALUE` in Basic auth, for one)."""
    for shift in range(3):
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            text = enc(b"\0" * shift + raw)
            start = -(-8 * shift // 6)
            end = 8 * (shift + len(raw)) // 6
            yield text[start:end]


def forms(value: bytes) -> dict[str, bytes]:
    out = {"raw": value, "hex": value.hex().encode(), "HEX": value.hex().upper().encode()}
    for i, core in enumerate(_b64_cores(value)):
        out[f"base64#{i}"] = core
    return out


NEEDLES = {f"{name} ({form})": needle for name, v in VALUES.items()
           for form, needle in forms(v.encode()).items()}


def found_in(data: bytes, needles: Mapping[str, bytes] = NEEDLES) -> list[str]:
    return [label for label, needle in needles.items() if needle in data]


def _data_regions(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the parts of a file that hold data: a sparse disk or RAM image is read
    where it was written, not as gigabytes of zeros."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        pos = end


def search_tree(root: Path, needles: Mapping[str, bytes] = NEEDLES) -> list[str]:
    """Every (file, needle) hit under `root`; symlinks (the shared cache) are not followed."""
    longest = max(len(n) for n in needles.values())
    hits: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
        hits += [f"{Path(dirpath) / name}: in the name" for name in [*filenames, *dirnames]
                 if found_in(name.encode(), needles)]
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            if name.startswith("state.db"):
                # all of them at once, read by another process (conftest.db_file_bytes)
                if name == "state.db":
                    hits += [f"{path}*: {label}"
                             for label in found_in(db_file_bytes(path.parent), needles)]
                continue
            with open(path, "rb") as f:
                fd = f.fileno()
                for start, end in _data_regions(fd, os.fstat(fd).st_size):
                    os.lseek(fd, start, os.SEEK_SET)
                    tail = b""
                    left = end - start
                    while left > 0:
                        chunk = os.read(fd, min(left, 1 << 20))
                        if not chunk:
                            break
                        left -= len(chunk)
                        hits += [f"{path}: {label}" for label in found_in(tail + chunk, needles)]
                        tail = chunk[-longest:]
    return sorted(set(hits))


def test_the_search_finds_planted_values(tmp_path: Path) -> None:
    """The detector itself: every form, at any offset, in a sparse file and across chunks."""
    value = VALUES["FILE_TOKEN"].encode()
    for i, prefix in enumerate((b"", b"u", b"us", b"user:")):
        for form in ("raw", "b64", "hex"):
            data = {"raw": prefix + value, "hex": (prefix + value).hex().encode(),
                    "b64": base64.b64encode(prefix + value)}[form]
            path = tmp_path / f"{form}{i}"
            with open(path, "wb") as f:
                f.truncate(64 << 20)
                f.seek(32 << 20)  # data from here on; the value straddles two 1 MiB reads
                f.write(b"x" * ((1 << 20) - 7) + data)
            hits = search_tree(tmp_path)
            assert any(h.startswith(f"{path}: FILE_TOKEN") for h in hits), (form, i, hits)
            path.unlink()
    (tmp_path / VALUES["ENV_TOKEN"]).touch()
    assert search_tree(tmp_path) == [f"{tmp_path / VALUES['ENV_TOKEN']}: in the name"]


@dataclass
class Env:
    state: Path
    cache: Path
    secret_file: Path
    environ: dict[str, str]

    def sandboxes(self) -> list[Path]:
        root = self.state / "sandboxes"
        return sorted(root.iterdir()) if root.exists() else []

    def search(self) -> list[str]:
        hits = search_tree(self.state) + search_tree(self.cache)
        # The host-wide runtime dir (VMM identities, the VMM's empty root), where there is one.
        run = Path(os.environ.get("MATCHLOCK_RUN_DIR", "/run/matchlock"))
        return hits + (search_tree(run) if run.is_dir() else [])

    def gc(self) -> subprocess.CompletedProcess[bytes]:
        r = subprocess.run([MATCHLOCK, "gc"], capture_output=True, env=self.environ,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        assert found_in(r.stdout + r.stderr) == []
        # Sandboxes kept by MATCHLOCK_KEEP_SANDBOX are stopped, which gc leaves for prune.
        p = subprocess.run([MATCHLOCK, "prune"], capture_output=True, env=self.environ,
                           timeout=60)
        assert p.returncode == 0, p.stderr
        assert found_in(p.stdout + p.stderr) == []
        return r


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("hygiene")
    cache = base / "cache"
    cache.mkdir()
    real = cache_dir()
    for name in SHARED:
        if (real / name).exists():
            (cache / name).symlink_to(real / name)
    secret_file = base / "file-token"
    secret_file.write_text(VALUES["FILE_TOKEN"] + "\n")
    secret_file.chmod(0o600)
    environ = {
        **os.environ,
        "MATCHLOCK_STATE_DIR": str(base / "state"),
        "MATCHLOCK_CACHE_DIR": str(cache),
        "MATCHLOCK_KEEP_SANDBOX": "1",
        "ENV_TOKEN": VALUES["ENV_TOKEN"],
    }
    e = Env(base / "state", cache, secret_file, environ)
    layout = TESTDATA / "python-3.12-alpine"
    if not (layout / "index.json").exists():
        pytest.fail(f"test data missing: {layout} (run scripts/testdata.sh)")
    r = subprocess.run([MATCHLOCK, "image", "import", PYTHON_IMAGE, str(layout)],
                       capture_output=True, env=environ, timeout=600)
    assert r.returncode == 0, r.stderr
    yield e
    e.gc()
    assert e.sandboxes() == []


def secret_flags(env: Env) -> list[str]:
    return ["--secret", f"ENV_TOKEN@{HOSTS}",
            "--secret", f"INLINE_TOKEN={VALUES['INLINE_TOKEN']}@{HOSTS}",
            "--secret-file", f"FILE_TOKEN={env.secret_file}@{HOSTS}"]


def run_flags(upstream: Upstream, env: Env) -> list[str]:
    return ["run", "--image", PYTHON_IMAGE, "--allow-host", "other.test",
            "--add-host", "api.test:10.99.0.2", "--add-host", "other.test:10.99.0.2",
            # Pinned to an address on the tests' link where nobody answers: a failing upstream.
            "--add-host", "down.test:10.99.0.3",
            "--upstream-ca", str(upstream.ca), "--log-network", *secret_flags(env)]


GUEST = """
import os, sys, time, urllib.error as e, urllib.request as u
env = os.environ
for k in sorted(env):
    if k.endswith("_TOKEN"):
        print(f"{k}={env[k]}")
ALL = {"X-Env": env["ENV_TOKEN"], "X-Inline": env["INLINE_TOKEN"], "X-File": env["FILE_TOKEN"]}
def get(label, url, headers):
    try:
        with u.urlopen(u.Request(url, headers=headers), timeout=60) as r:
            print(label, r.status, r.read().decode(), flush=True)
    except e.HTTPError as x:
        print(label, x.code, x.read().decode(), flush=True)
    except Exception as x:
        print(label, "ERR", type(x).__name__, x, flush=True)
get("http", "http://api.test/headers?t=" + env["FILE_TOKEN"], ALL)
if sys.argv[1] == "all":
    get("https", "https://api.test/headers?t=" + env["INLINE_TOKEN"], ALL)
    get("other", "https://other.test/leak", {"X-Env": env["ENV_TOKEN"]})
    get("down", "http://down.test/down?t=" + env["ENV_TOKEN"], ALL)
else:
    print("ready", flush=True)
    time.sleep(600)
"""


def guest(what: str) -> list[str]:
    return ["--", "python3", "-c", GUEST, what]


def _upstream_saw_all_values(upstream: Upstream, since: str) -> None:
    heads = upstream.log("heads.log").replace(since, "")
    for name, header in (("ENV_TOKEN", "X-Env"), ("INLINE_TOKEN", "X-Inline"),
                         ("FILE_TOKEN", "X-File")):
        assert f"{header}: {VALUES[name]}" in heads, (name, heads)


def test_values_reach_the_upstream_and_nothing_matchlock_writes(
        upstream: Upstream, env: Env) -> None:
    before = upstream.log("heads.log")
    r = subprocess.run([MATCHLOCK, *run_flags(upstream, env), *guest("all")],
                       capture_output=True, env=env.environ, timeout=300)
    out, err = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    # First, so that a crash (a traceback) is searched too.
    assert found_in(r.stdout) == [] and found_in(r.stderr) == [], err
    assert r.returncode == 0, (out, err)
    # The guest saw placeholders, the requests went where they were allowed, and the
    # placeholder headed for another host was refused.
    for name in VALUES:
        assert f"{name}=SANDBOX_SECRET_" in out, out
    for outcome in ("http 200 ", "https 200 ", "other 403 ", "down 502 "):
        assert outcome in out, "\n".join((out, err))
    assert "net allow api.test:80 GET" in err and "other.test" in err, err
    # Positive control: the values were substituted (headers and the request target).
    _upstream_saw_all_values(upstream, before)
    heads = upstream.log("heads.log").replace(before, "")
    assert f"GET /headers?t={VALUES['FILE_TOKEN']} " in heads
    assert f"GET /headers?t={VALUES['INLINE_TOKEN']} " in heads
    # …and appear nowhere matchlock wrote: state and cache (the output was searched above).
    [sandbox] = env.sandboxes()
    assert (sandbox / "console.log").exists()  # empty after a snapshot restore: a quiet kernel
    for kept in ("network.log", "upper.ext4"):
        assert (sandbox / kept).stat().st_size > 0, kept  # the search below is not vacuous
    # The sandbox's record (config with secret names and hosts) is searched too.
    assert b"FILE_TOKEN" in db_file_bytes(env.state)
    assert "down.test" in (sandbox / "network.log").read_text()
    assert any((env.cache / "templates").iterdir()), "no snapshot template was made"
    assert env.search() == []
    env.gc()
    assert env.sandboxes() == []


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _read_until(proc: subprocess.Popen[bytes], marker: bytes, timeout: float) -> bytes:
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data:
        if proc.poll() is not None:
            assert proc.stderr is not None
            err = proc.stderr.read()
            assert found_in(data + err) == []
            raise AssertionError(f"exited {proc.returncode}: {(data + err).decode()}")
        assert time.monotonic() < deadline, data
        chunk = proc.stdout.read()
        if chunk:
            data += chunk
        else:
            time.sleep(0.1)
    return data


def test_a_killed_run_leaves_no_value_and_gc_removes_what_it_left(
        upstream: Upstream, env: Env) -> None:
    before = upstream.log("heads.log")
    owners = sandbox_owners(env.environ)
    proc = subprocess.Popen([MATCHLOCK, *run_flags(upstream, env), *guest("then-wait")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env.environ)
    owner = None
    try:
        out = _read_until(proc, b"ready\n", 240)
        assert b"http 200 " in out, out
        _upstream_saw_all_values(upstream, before)
        # The sandbox's owner: `run` itself, or the fork server's fork that serves it.
        owner = new_owner(owners, env.environ)
        # Every process started for the run (QEMU above all, which a guest escape would land
        # in), and the fork server, which holds no client's environment: no value in its
        # environment or command line.
        children = _descendants(owner) + _descendants(proc.pid)
        qemu = [pid for pid in children
                if b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert qemu, children
        servers = procs.fork_servers(env.state)
        for pid in [*children, owner, *servers]:
            for what in ("environ", "cmdline"):
                data = Path(f"/proc/{pid}/{what}").read_bytes()
                assert found_in(data) == [], (pid, what, found_in(data))
        [sandbox] = env.sandboxes()
        assert (sandbox / "network.log").stat().st_size > 0
    finally:
        # The owner dies unannounced (the CLI with it, when they are one process).
        os.kill(owner if owner is not None else proc.pid, signal.SIGKILL)
        rest_out, err = proc.communicate(timeout=30)
    assert proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), err
    assert found_in(out + rest_out) == [] and found_in(err) == []
    assert b"net allow api.test:80 GET /headers" in err, err
    # What the killed owner left behind (its sandbox dir, perhaps a VM) holds no value…
    assert len(env.sandboxes()) == 1
    assert env.search() == []
    # …and gc takes it away.
    r = env.gc()
    assert b"removed vm-" in r.stdout, r.stdout
    assert env.sandboxes() == []
    assert env.search() == []


# --- errors: the value is never echoed ------------------------------------------------------


def _bad_runs(env: Env) -> list[list[str]]:
    v = VALUES["INLINE_TOKEN"]
    empty = env.secret_file.with_name("empty")
    empty.write_bytes(b"")
    return [
        ["--secret", f"BAD NAME={v}@api.test"],
        ["--secret", f"K={v}@"],
        ["--secret", f"K={v}"],
        ["--secret", f"K={v}@api.test:443"],
        ["--secret", f"K={v}@10.0.0.1"],
        ["--secret", f"{v}@api.test"],
        ["--secret-file", f"K={v}@api.test"],  # a value where the path belongs
        ["--secret-file", f"K={empty}@api.test"],
        ["--secret-file", f"K={env.secret_file}@api.test", "--secret", f"K={v}@api.test"],
        ["--secret", f"K={v}@api.test", "--no-network"],
        ["--secret", "ENV_TOKEN@api.test", "--allow-host", "bad..host"],
        ["--secret", "ENV_TOKEN@api.test", "--upstream-ca", "/nonexistent"],
        ["--secret", f"K={v}@api.test", "--cpus", "x"],
        ["--secret", f"K={v}@api.test", "--memory", "1"],
    ]


def test_errors_never_echo_a_value(env: Env) -> None:
    before = env.sandboxes()
    for flags in _bad_runs(env):
        r = subprocess.run([MATCHLOCK, "run", *flags, "--", "true"], capture_output=True,
                           env=env.environ, timeout=60)
        assert r.returncode != 0, flags
        assert b"Traceback" not in r.stderr, r.stderr
        assert found_in(r.stdout + r.stderr) == [], (flags, r.stderr)
        last = r.stderr.splitlines()[-1]
        assert last.startswith((b"matchlock: ", b"Error: ")), r.stderr
    assert env.sandboxes() == before


def test_an_environment_value_that_is_not_utf8_is_not_quoted(env: Env) -> None:
    raw = b"notutf8-\xff\xfe-" + secrets.token_hex(8).encode()
    environ: dict[bytes, bytes] = {os.fsencode(k): os.fsencode(v)
                                   for k, v in env.environ.items()}
    environ[b"RAW_TOKEN"] = raw
    r = subprocess.run([MATCHLOCK, "run", "--secret", "RAW_TOKEN@api.test", "--", "true"],
                       capture_output=True, env=environ, timeout=60)
    assert (r.returncode, r.stderr) == (
        1, b"matchlock: invalid --secret: the value of RAW_TOKEN is not UTF-8\n")
    assert found_in(r.stdout + r.stderr, forms(raw)) == []
