"""This project's SDK (`from matchlock import Client`) against `matchlock rpc`, side by side
with the CLI and with a namespace sandbox (Anthropic's sandbox-runtime, `srt`) on this host.

    MATCHLOCK_HOME=/tmp/somewhere .venv/bin/python benchmarks/sdk.py [--runs N] [--json FILE]

1. Start-up, interleaved in one run: `matchlock run -- true` (end to end: CLI start, boot,
   exec, teardown) against SDK `Client().start()` + `launch(Sandbox(busybox))` (rpc process
   spawn included), and the SDK's whole `launch` + `exec("true")` + `close()`.
2. `exec("true")` round trip through the SDK on one sandbox.
3. File transfer through the protocol: `write_file`/`read_file` at the sizes one JSON-RPC
   line allows (a line is at most 10 MiB, so a write carries at most ~7.5 MiB of raw data;
   `read_file` answers at most 16 MiB), and 64 MiB moved as a stream of base64 chunks
   (`exec_pipe` with `cat > FILE`, `exec_stream` with `cat FILE`), which any size allows.
   `--only files64 [--before-bin PATH | --before-agent PATH]`: 64 MiB each way, before (the
   matchlock, or only the guest agent, of the tree before; the reference methods at their
   limits, `exec_pipe`/`exec_stream` for 64 MiB) and after (`write_file`/`read_file` of
   64 MiB over the data channel, and as base64 JSON lines), interleaved rep by rep.
4. An agent loop: 50 short shell commands in one sandbox, one at a time, each waiting for
   its output: matchlock SDK (launch + 50 x exec + close), matchlock CLI on a detached
   sandbox (`matchlock exec` per command), srt per command (`srt -c CMD`, a new namespace
   sandbox each time, as agents call it), srt with one long-lived shell (one sandbox, commands
   written to its stdin).

Every figure carries the accelerator the VMs ran with and the load averages before and after.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matchlock import Client, Config, Sandbox

MATCHLOCK = str(Path(sys.executable).with_name("matchlock"))
CONFIG = Config(binary_path=MATCHLOCK)
IMAGE = "matchlock-builtin:busybox"
MiB = 1 << 20

# Short commands an agent runs while working on files; each system runs them in a scratch
# directory of its own, so every command's output is the same on both (checked).
AGENT_COMMANDS = [
    "printf 'alpha\\nbeta\\ngamma\\n' > notes.txt && wc -l < notes.txt",
    "grep -n beta notes.txt",
    "sed -i 's/beta/BETA/' notes.txt && cat notes.txt",
    "mkdir -p src/pkg && echo 'x = 1' > src/pkg/mod.py && find src | sort",
    "seq 1 1000 | awk '{s += $1} END {print s}'",
    "ls -1 | sort",
    "head -c 4096 /dev/zero | wc -c",
    "echo $((6 * 7))",
    "cat src/pkg/mod.py | tr a-z A-Z",
    "rm -rf src && ls -1",
]
LOOP = AGENT_COMMANDS * 5


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def accel_of_running() -> str:
    """The accelerator of a VMM this benchmark started (from its command line)."""
    home = os.environ.get("MATCHLOCK_HOME", "")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or b"qemu-system" not in argv[0] or home.encode() not in b" ".join(argv):
            continue
        for i, a in enumerate(argv):
            if a in (b"-accel", b"-machine") and i + 1 < len(argv):
                for part in argv[i + 1].decode().split(","):
                    if part in ("tcg", "kvm") or part.startswith("accel="):
                        return part.removeprefix("accel=").upper()
    return "unknown"


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# --- 1 and 2 ------------------------------------------------------------------------------


def startup(runs: int, execs: int) -> dict[str, Any]:
    run_true, launch, whole, exec_true = [], [], [], []
    accel = "unknown"
    for i in range(runs):
        run_true.append(timed(lambda: subprocess.run([MATCHLOCK, "run", "--", "true"],
                                                     check=True, capture_output=True)))
        t = time.perf_counter()
        c = Client(CONFIG)
        c.start()
        c.launch(Sandbox(IMAGE))
        launch.append(time.perf_counter() - t)
        c.exec("true")
        if i == 0:
            accel = accel_of_running()
            for _ in range(execs):
                t1 = time.perf_counter()
                c.exec("true")
                exec_true.append(time.perf_counter() - t1)
        c.close()
        whole.append(time.perf_counter() - t)
        c.remove()
    return {
        "accel": accel,
        "run_true_p50_s": p50(run_true),
        "sdk_launch_p50_s": p50(launch),
        "sdk_launch_minus_run_true_ms": (p50(launch) - p50(run_true)) * 1000,
        "sdk_launch_exec_close_p50_s": p50(whole),
        "exec_true_p50_ms": p50(exec_true) * 1000,
        "exec_true_p95_ms": sorted(exec_true)[int(len(exec_true) * 0.95)] * 1000,
        "runs": runs, "execs": execs,
    }


# --- 3 --------------------------------------------------------------------------------------


class Sink(io.RawIOBase):
    """A binary writer that hashes what it gets (the SDK writes bytes to binary writers)."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.h.update(b)
        self.n += len(b)
        return len(b)


def transfer(c: Client, reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size in (1 * MiB, 7 * MiB):
        data = os.urandom(size)
        w = []
        for _ in range(reps):
            t = time.perf_counter()
            c.write_file("/tmp/blob", data)
            w.append(time.perf_counter() - t)
        r = []
        for _ in range(reps):
            t = time.perf_counter()
            back = c.read_file("/tmp/blob")
            r.append(time.perf_counter() - t)
            assert back == data
        out[f"write_file_{size // MiB}MiB_MBps"] = size / p50(w) / 1e6
        out[f"read_file_{size // MiB}MiB_MBps"] = size / p50(r) / 1e6
    big = 16 * MiB  # read_file's limit; written by a stream
    data = os.urandom(big)
    c.exec_pipe("cat > /tmp/blob", stdin=io.BytesIO(data))
    r = []
    for _ in range(reps):
        t = time.perf_counter()
        assert c.read_file("/tmp/blob") == data
        r.append(time.perf_counter() - t)
    out["read_file_16MiB_MBps"] = big / p50(r) / 1e6

    size = 64 * MiB
    data = os.urandom(size)
    digest = hashlib.sha256(data).hexdigest()
    w, r = [], []
    for _ in range(reps):
        t = time.perf_counter()
        res = c.exec_pipe("cat > /tmp/big", stdin=io.BytesIO(data))
        w.append(time.perf_counter() - t)
        assert res.exit_code == 0
        sink = Sink()
        t = time.perf_counter()
        res2 = c.exec_stream("cat /tmp/big", stdout=sink)  # type: ignore[arg-type]
        r.append(time.perf_counter() - t)
        assert res2.exit_code == 0 and sink.n == size and sink.h.hexdigest() == digest
    out["stream_in_64MiB_MBps"] = size / p50(w) / 1e6
    out["stream_out_64MiB_MBps"] = size / p50(r) / 1e6
    return out


def files(reps: int) -> dict[str, Any]:
    with Client(CONFIG) as c:
        c.launch(Sandbox(IMAGE).with_memory(512))
        result = transfer(c, reps)
    c.remove()
    return result


def _client(agent: str | None, data_channel: bool = True, binary: str | None = None
            ) -> Client:
    """A launched client; `agent`: the guest agent binary its sandbox boots with (None: its
    tree's), `binary`: the `matchlock` whose `rpc` it drives (None: this tree's). Without the
    data channel the streamed methods go as base64 JSON lines."""
    from matchlock.sdk.transport import RPCProcess

    saved = os.environ.get("MATCHLOCK_AGENT")
    if agent:
        os.environ["MATCHLOCK_AGENT"] = agent
    try:
        c = Client(Config(binary_path=binary) if binary else CONFIG)
        c._rpc = RPCProcess(c._argv("rpc"), None, data_channel=data_channel)
        c.launch(Sandbox(IMAGE).with_memory(512))
    finally:
        if agent:
            if saved is None:
                del os.environ["MATCHLOCK_AGENT"]
            else:
                os.environ["MATCHLOCK_AGENT"] = saved
    return c


def files64(reps: int, before_agent: str | None, before_bin: str | None) -> dict[str, Any]:
    """64 MiB each way, before and after, interleaved rep by rep in one run.

    before: the `matchlock` of `before_bin` (the tree before this change, its rpc server and
    its guest agent: one virtio-serial page per poll; or only the agent `before_agent` under
    this tree's server, which is fine while the consumer keeps up: an old agent ignores file
    read credit) and the ways an SDK moved files then: the reference `write_file` (one JSON
    line: 7 MiB at most) and `read_file` (16 MiB at most), and for 64 MiB `exec_pipe("cat >
    F")` / `exec_stream("cat F")`.
    after: this tree's agent, `write_file` / `read_file` of 64 MiB (streamed over the data
    channel), and the same streamed methods as base64 JSON lines (no data channel: `use_sudo`)."""
    size = 64 * MiB
    data = os.urandom(size)
    digest = hashlib.sha256(data).hexdigest()
    seven, sixteen = data[: 7 * MiB], data[: 16 * MiB]
    before = _client(before_agent, False, before_bin)
    after, b64 = _client(None), _client(None, False)
    t: dict[str, list[float]] = {}

    def rec(name: str, fn: Callable[[], Any]) -> None:
        t.setdefault(name, []).append(timed(fn))

    def check(c: Client, path: str, want: str) -> None:
        assert c.exec(f"sha256sum < {path}").stdout.split()[0] == want

    try:
        for _ in range(reps):
            # before
            rec("before_write_file_7MiB", lambda: before._proc.call(
                "write_file", {"path": "/tmp/s", "content": base64.b64encode(seven).decode()}))
            before.exec("head -c 16777216 /tmp/big > /tmp/s16 2>/dev/null; true")
            rec("before_exec_pipe_in_64MiB",
                lambda: before.exec_pipe("cat > /tmp/big", stdin=io.BytesIO(data)))
            check(before, "/tmp/big", digest)
            before.exec("head -c 16777216 /tmp/big > /tmp/s16")
            rec("before_read_file_16MiB", lambda: assert_eq(base64.b64decode(
                before._proc.call("read_file", {"path": "/tmp/s16"})["content"]), sixteen))
            sink = Sink()
            rec("before_exec_stream_out_64MiB",
                lambda s=sink: before.exec_stream("cat /tmp/big", stdout=s))  # type: ignore[misc]
            assert sink.n == size and sink.h.hexdigest() == digest
            # after
            rec("after_write_file_64MiB", lambda: after.write_file("/tmp/big", data))
            check(after, "/tmp/big", digest)
            rec("after_read_file_64MiB", lambda: assert_eq(after.read_file("/tmp/big"), data))
            rec("after_b64_write_file_64MiB", lambda: b64.write_file("/tmp/big", data))
            check(b64, "/tmp/big", digest)
            rec("after_b64_read_file_64MiB", lambda: assert_eq(b64.read_file("/tmp/big"), data))
    finally:
        for c in (before, after, b64):
            c.close()
            c.remove()
    sizes = {"7MiB": 7 * MiB, "16MiB": 16 * MiB, "64MiB": size}
    out: dict[str, Any] = {"reps": reps, "before_bin": before_bin or "this tree's",
                           "before_agent": before_agent or "before_bin's"}
    for name, xs in t.items():
        n = sizes[name.rsplit("_", 1)[1]]
        out[name + "_MBps"] = round(n / p50(xs) / 1e6, 1)
        out[name + "_all_MBps"] = [round(n / x / 1e6, 1) for x in xs]
    out["ratio_write_64MiB_after_vs_exec_pipe"] = round(
        out["after_write_file_64MiB_MBps"] / out["before_exec_pipe_in_64MiB_MBps"], 2)
    out["ratio_read_64MiB_after_vs_exec_stream"] = round(
        out["after_read_file_64MiB_MBps"] / out["before_exec_stream_out_64MiB_MBps"], 2)
    return out


def assert_eq(a: bytes, b: bytes) -> None:
    assert a == b


# --- 4 --------------------------------------------------------------------------------------


def loop_sdk() -> tuple[float, list[float], list[str]]:
    per, outs = [], []
    t = time.perf_counter()
    with Client(CONFIG) as c:
        c.launch(Sandbox(IMAGE))
        c.exec("mkdir -p /tmp/agent")
        for cmd in LOOP:
            t1 = time.perf_counter()
            r = c.exec(cmd, working_dir="/tmp/agent")
            per.append(time.perf_counter() - t1)
            assert r.exit_code == 0, (cmd, r.stderr)
            outs.append(r.stdout)
    total = time.perf_counter() - t
    c.remove()
    return total, per, outs


def loop_cli() -> tuple[float, list[float], list[str]]:
    per, outs = [], []
    t = time.perf_counter()
    sid = subprocess.run([MATCHLOCK, "run", "-d"], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        subprocess.run([MATCHLOCK, "exec", sid, "--", "mkdir", "-p", "/tmp/agent"], check=True)
        for cmd in LOOP:
            t1 = time.perf_counter()
            r = subprocess.run([MATCHLOCK, "exec", "-w", "/tmp/agent", sid, "--", "sh", "-c",
                                cmd], capture_output=True, text=True, check=True)
            per.append(time.perf_counter() - t1)
            outs.append(r.stdout)
    finally:
        subprocess.run([MATCHLOCK, "rm", "-f", sid], check=True, capture_output=True)
    return time.perf_counter() - t, per, outs


def _srt_settings(work: Path) -> Path:
    path = work.parent / "srt-settings.json"
    path.write_text(json.dumps({
        "network": {"allowedDomains": [], "deniedDomains": []},
        "filesystem": {"denyRead": [], "allowWrite": [str(work)], "denyWrite": []},
    }))
    return path


def loop_srt_per_command(srt: str) -> tuple[float, list[float], list[str]]:
    per, outs = [], []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d) / "agent"
        work.mkdir()
        settings = _srt_settings(work)
        t = time.perf_counter()
        for cmd in LOOP:
            t1 = time.perf_counter()
            r = subprocess.run([srt, "-s", str(settings), "-c", cmd], cwd=work,
                               capture_output=True, text=True, check=True)
            per.append(time.perf_counter() - t1)
            outs.append(r.stdout)
        return time.perf_counter() - t, per, outs


def loop_srt_shell(srt: str) -> tuple[float, list[float], list[str]]:
    """One srt sandbox running `sh`; each command is written to its stdin followed by a
    marker, and its output read up to the marker."""
    per, outs = [], []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d) / "agent"
        work.mkdir()
        settings = _srt_settings(work)
        t = time.perf_counter()
        p = subprocess.Popen([srt, "-s", str(settings), "-c", "sh"], cwd=work,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             bufsize=1)
        assert p.stdin is not None and p.stdout is not None
        for i, cmd in enumerate(LOOP):
            marker = f"__done_{i}__"
            t1 = time.perf_counter()
            p.stdin.write(f"{cmd}\necho {marker} $?\n")
            p.stdin.flush()
            lines: list[str] = []
            while True:
                line = p.stdout.readline()
                assert line, "srt shell ended"
                if line.startswith(marker):
                    assert line.split()[1] == "0", (cmd, lines)
                    break
                lines.append(line)
            per.append(time.perf_counter() - t1)
            outs.append("".join(lines))
        p.stdin.close()
        p.wait(30)
        return time.perf_counter() - t, per, outs


def agent_loop() -> dict[str, Any]:
    runners: dict[str, Callable[[], tuple[float, list[float], list[str]]]] = {
        "matchlock SDK (launch + 50 exec + close)": loop_sdk,
        "matchlock CLI (run -d + 50 x `matchlock exec` + rm)": loop_cli,
    }
    srt = shutil.which("srt")
    if srt:
        runners["srt per command (50 x `srt -c CMD`)"] = lambda: loop_srt_per_command(srt)
        runners["srt one shell (one sandbox, 50 commands on stdin)"] = (
            lambda: loop_srt_shell(srt))
    out: dict[str, Any] = {}
    reference: list[str] | None = None
    for name, fn in runners.items():
        total, per, outs = fn()
        if reference is None:
            reference = outs
        assert outs == reference, f"{name}: outputs differ from the first system's"
        out[name] = {"total_s": total, "per_command_p50_ms": p50(per) * 1000,
                     "per_command_max_ms": max(per) * 1000}
    return out


def machine() -> dict[str, Any]:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                          text=True).stdout.splitlines()[0]
    srt = shutil.which("srt")
    srt_version = (subprocess.run([srt, "--version"], capture_output=True, text=True)
                   .stdout.strip() if srt else "not installed")
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "qemu": qemu,
            "python": platform.python_version(), "srt": srt_version}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--execs", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", choices=["startup", "files", "files64", "loop"], action="append")
    ap.add_argument("--before-agent", metavar="PATH",
                    help="files64: the guest agent binary of the tree before (e.g. main's, "
                         "from ~/.cache/matchlock/agent/KEY/matchlock-agent)")
    ap.add_argument("--before-bin", metavar="PATH",
                    help="files64: the matchlock of the tree before (e.g. main's checkout's "
                         ".venv/bin/matchlock): its rpc server and its agent")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    parts = a.only or ["startup", "files", "loop"]
    result: dict[str, Any] = {"machine": machine(), "load_before": load()}
    sampled: list[tuple[float, float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(2):
            sampled.append(os.getloadavg())

    threading.Thread(target=sample, daemon=True).start()
    if "startup" in parts:
        result["startup"] = startup(a.runs, a.execs)
    if "files" in parts:
        result["files"] = files(a.reps)
    if "files64" in parts:
        result["files64"] = files64(a.reps, a.before_agent, a.before_bin)
    if "loop" in parts:
        result["agent_loop"] = agent_loop()
    stop.set()
    result["load_after"] = load()
    if sampled:
        result["load1_during_min_max"] = [min(s[0] for s in sampled),
                                          max(s[0] for s in sampled)]
    text = json.dumps(result, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
