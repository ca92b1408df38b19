"""`Client`: a sandbox driven through `matchlock rpc` (one child process per client).

    with Client() as client:
        client.launch(Sandbox("alpine:latest"))
        print(client.exec("echo hello").stdout)
    client.remove()

Same methods, arguments and results as the official SDK; in addition `allow_list_add` /
`allow_list_delete`, `exec(..., user=)`, `on_event` (every network decision, as the server
reports it) and output writers that may be binary (bytes are then written unchanged).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import io
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from typing import IO, Any

from matchlock.errors import MatchlockError
from matchlock.sdk import files as F
from matchlock.sdk import params as P
from matchlock.sdk.builder import Sandbox
from matchlock.sdk.hooks import HookServer
from matchlock.sdk.pool import Pool, command, default_config, spawn_rpc
from matchlock.sdk.transport import RPCProcess
from matchlock.sdk.types import (
    Config,
    CreateOptions,
    ExecInteractiveResult,
    ExecPipeResult,
    ExecResult,
    ExecStreamResult,
    FileInfo,
    PortForwardBinding,
    VolumeInfo,
)

CHUNK = 1 << 16


def emit(writer: IO[Any] | None, data: bytes) -> None:
    """Output to a writer: text writers get UTF-8 text (undecodable bytes replaced, as the
    official SDK does), binary ones the bytes unchanged."""
    if writer is None:
        return
    if isinstance(writer, io.TextIOBase) or hasattr(writer, "encoding"):
        writer.write(data.decode("utf-8", errors="replace"))
    else:
        writer.write(data)
    flush = getattr(writer, "flush", None)
    if callable(flush):
        flush()


class Client:
    """Thread-safe: requests may be issued from several threads at once."""

    def __init__(self, config: Config | None = None, *,
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 pool: Pool | None = None) -> None:
        self._config = default_config(config)
        self._on_event = on_event
        # With a pool, `matchlock rpc` starts at create/launch: a matching one adopts a
        # pool member's process instead (sdk/pool.py).
        self._pool = pool
        self._rpc: RPCProcess | None = None
        self._vm_id: str | None = None
        self._last_vm_id: str | None = None
        self._hooks: HookServer | None = None
        self._closed = False
        self._lock = threading.Lock()

    def __enter__(self) -> Client:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def vm_id(self) -> str | None:
        return self._vm_id

    def _argv(self, *args: str) -> list[str]:
        return command(self._config, *args)

    def start(self) -> None:
        with self._lock:
            if self._rpc is None and self._pool is None:
                self._rpc = self._spawn()

    def _spawn(self) -> RPCProcess:
        return spawn_rpc(self._config, self._on_event)

    def _from_pool(self, opts: CreateOptions) -> bool:
        """Adopt a ready pool member of exactly this configuration, if there is one; else
        start our own `matchlock rpc` (a cold create follows)."""
        assert self._pool is not None
        with self._lock:
            if self._rpc is not None or self._closed:
                return False
            member = self._pool.take(self._config, opts)
            if member is None:
                self._rpc = self._spawn()
                return False
            member.rpc.set_on_event(self._on_event)
            self._rpc, self._vm_id = member.rpc, member.vm_id
            return True

    @property
    def _proc(self) -> RPCProcess:
        if self._rpc is None or not self._rpc.alive:
            raise MatchlockError("Matchlock process not running")
        return self._rpc

    def close(self, timeout: float = 0) -> None:
        """Stop the sandbox (the server tears it down) and the rpc process."""
        if self._closed:
            return
        self._closed = True
        self._last_vm_id = self._vm_id
        self._stop_hooks()
        rpc = self._rpc
        if rpc is None or not rpc.alive:
            return
        wait = timeout if timeout and timeout > 0 else 2.0
        with contextlib.suppress(Exception):
            rpc.call("close", {"timeout_seconds": wait}, timeout=wait + 1.0)
        rpc.shutdown(wait)

    def remove(self) -> None:
        """Remove the closed sandbox's state (`matchlock rm ID`)."""
        vm_id = self._vm_id or self._last_vm_id
        if vm_id:
            subprocess.run(self._argv("rm", vm_id), capture_output=True, text=True, check=True)

    # --- volumes (through the CLI) ---------------------------------------------------------

    def _cli_json(self, *args: str) -> Any:
        r = subprocess.run(self._argv(*args), capture_output=True, text=True, check=True)
        try:
            return json.loads(r.stdout)
        except ValueError as e:
            raise MatchlockError(f"failed to parse `{' '.join(args[:2])}` output: {e}") from e

    def volume_create(self, name: str, size_mb: int = 10240) -> VolumeInfo:
        name = name.strip()
        if not name:
            raise MatchlockError("volume name is required")
        if size_mb <= 0:
            raise MatchlockError("volume size must be > 0")
        out = self._cli_json("volume", "create", name, "--size", str(size_mb), "--json")
        path = str(out.get("path", "")).strip() if isinstance(out, dict) else ""
        if not path:
            raise MatchlockError("failed to parse volume create output: missing Path")
        return VolumeInfo(str(out.get("name", "")).strip() or name,
                          str(out.get("size", "")).strip() or f"{float(size_mb):.1f} MB", path)

    def volume_list(self) -> list[VolumeInfo]:
        out = self._cli_json("volume", "ls", "--json")
        if not isinstance(out, list):
            raise MatchlockError("failed to parse volume list output: expected array")
        vols = []
        for e in out:
            if not isinstance(e, dict) or not e.get("name") or not e.get("path"):
                raise MatchlockError(f"failed to parse volume list output line: {e!r}")
            vols.append(VolumeInfo(str(e["name"]), str(e.get("size", "")), str(e["path"])))
        return vols

    def volume_remove(self, name: str) -> None:
        name = name.strip()
        if not name:
            raise MatchlockError("volume name is required")
        subprocess.run(self._argv("volume", "rm", name), capture_output=True, text=True,
                       check=True)

    # --- lifecycle -----------------------------------------------------------------------

    def _stop_hooks(self) -> None:
        if self._hooks is not None:
            self._hooks.close()
            self._hooks = None

    def create(self, opts: CreateOptions | None = None) -> str:
        opts = opts or CreateOptions()
        P.check_create(opts)
        if self._pool is not None and self._from_pool(opts):
            assert self._vm_id is not None
            if opts.port_forwards:
                self._forward(opts.port_forward_addresses, opts.port_forwards)
            return self._vm_id
        self._stop_hooks()
        rules = opts.network_interception.rules if opts.network_interception else []
        if any(r.hook is not None for r in rules):
            P.network_rules(rules)  # refuse a bad rule before a socket exists
            self._hooks = HookServer(rules, [P.callback_id(i) for i in range(len(rules))])
        try:
            params = P.create_params(opts, self._hooks.path if self._hooks else "")
            vm_id = P.created_id(self._proc.call("create", params))
        except BaseException:
            self._stop_hooks()
            raise
        self._vm_id = vm_id
        if opts.port_forwards:
            self._forward(opts.port_forward_addresses, opts.port_forwards)
        return self._vm_id

    def launch(self, sandbox: Sandbox) -> str:
        """Create a sandbox from a builder and start the image's entrypoint in it."""
        opts = copy.deepcopy(sandbox.options())
        opts.launch_entrypoint = True
        return self.create(opts)

    # --- network ---------------------------------------------------------------------------

    def _forward(self, addresses: list[str] | None, forwards: list[Any]
                 ) -> list[PortForwardBinding]:
        if not forwards:
            return []
        return P.bindings(self._proc.call("port_forward",
                                          P.port_forward_params(addresses, forwards)))

    def port_forward(self, *specs: str) -> list[PortForwardBinding]:
        """Forward host ports to guest ports (`[LOCAL:]REMOTE`), on 127.0.0.1."""
        return self.port_forward_with_addresses(None, *specs)

    def port_forward_with_addresses(self, addresses: list[str] | None, *specs: str
                                    ) -> list[PortForwardBinding]:
        return self._forward(addresses, [P.parse_port_forward(s) for s in specs])

    def allow_list_add(self, *hosts: str) -> list[str]:
        """Allow more hosts while the sandbox runs; the resulting allow-list."""
        r = self._proc.call("allow_list_add", {"hosts": list(hosts)})
        return list(r.get("allowed_hosts") or [])

    def allow_list_delete(self, *hosts: str) -> list[str]:
        r = self._proc.call("allow_list_delete", {"hosts": list(hosts)})
        return list(r.get("allowed_hosts") or [])

    # --- commands ------------------------------------------------------------------------

    @staticmethod
    def _cmd(command: str, working_dir: str, user: str) -> dict[str, Any]:
        p: dict[str, Any] = {"command": command}
        if working_dir:
            p["working_dir"] = working_dir
        if user:
            p["user"] = user
        return p

    def exec(self, command: str, working_dir: str = "", timeout: float | None = None,
             user: str = "") -> ExecResult:
        """Run `sh -c command`; its exit code and whole output."""
        return P.exec_result(self._proc.call("exec", self._cmd(command, working_dir, user),
                                             timeout=timeout))

    def exec_stream(self, command: str, stdout: IO[Any] | None = None,
                    stderr: IO[Any] | None = None, working_dir: str = "",
                    timeout: float | None = None, user: str = "") -> ExecStreamResult:
        """Like exec, with output written to the writers as it is produced."""
        def on(method: str, params: dict[str, Any]) -> None:
            data = base64.b64decode(str(params.get("data", "")))
            emit(stdout if method.endswith(".stdout") else stderr, data)

        r = self._proc.call("exec_stream", self._cmd(command, working_dir, user), on, timeout)
        return ExecStreamResult(int(r["exit_code"]), int(r.get("duration_ms") or 0))

    def _interactive(self, method: str, params: dict[str, Any], stdin: IO[Any] | None,
                     outputs: dict[str, IO[Any] | None],
                     resize: Iterable[tuple[int, int]] | None, timeout: float | None
                     ) -> dict[str, Any]:
        rpc = self._proc
        ready = threading.Event()
        done = threading.Event()

        def on(name: str, p: dict[str, Any]) -> None:
            if name == f"{method}.ready":
                ready.set()
            elif name in outputs:
                emit(outputs[name], base64.b64decode(str(p.get("data", ""))))

        req_id, pending = rpc.begin(method, params, on)

        def pump_stdin() -> None:
            while not ready.wait(0.05):
                if done.is_set():
                    return
            while stdin is not None and not done.is_set():
                try:
                    chunk = stdin.read(CHUNK) if not hasattr(stdin, "read1") else stdin.read1(CHUNK)
                except Exception:
                    break
                if chunk is None:
                    continue
                data = chunk.encode() if isinstance(chunk, str) else bytes(chunk)
                if not data:
                    break
                rpc.send(f"{method}.stdin", F.data_params(req_id, data))
            if not done.is_set():
                rpc.send(f"{method}.stdin_eof", {"id": req_id})

        def pump_resize() -> None:
            while not ready.wait(0.05):
                if done.is_set():
                    return
            for size in resize or ():
                if done.is_set():
                    return
                rpc.send("exec_tty.resize", {"id": req_id, "rows": int(size[0]),
                                             "cols": int(size[1])})

        threads = [threading.Thread(target=pump_stdin, daemon=True)]
        if resize is not None:
            threads.append(threading.Thread(target=pump_resize, daemon=True))
        for t in threads:
            t.start()
        try:
            result: dict[str, Any] = rpc.finish(method, req_id, pending, timeout)
            return result
        finally:
            done.set()
            for t in threads:
                t.join(0.2)

    def exec_pipe(self, command: str, stdin: IO[Any] | None = None,
                  stdout: IO[Any] | None = None, stderr: IO[Any] | None = None,
                  working_dir: str = "", timeout: float | None = None, user: str = ""
                  ) -> ExecPipeResult:
        """Run a command with stdin streamed from `stdin` (no terminal)."""
        r = self._interactive("exec_pipe", self._cmd(command, working_dir, user), stdin,
                              {"exec_pipe.stdout": stdout, "exec_pipe.stderr": stderr}, None,
                              timeout)
        return ExecPipeResult(int(r["exit_code"]), int(r.get("duration_ms") or 0))

    def exec_interactive(self, command: str, stdin: IO[Any] | None = None,
                         stdout: IO[Any] | None = None, working_dir: str = "", rows: int = 24,
                         cols: int = 80, resize: Iterable[tuple[int, int]] | None = None,
                         timeout: float | None = None, user: str = "") -> ExecInteractiveResult:
        """Run a command on a pseudo-terminal of rows x cols."""
        params = self._cmd(command, working_dir, user)
        params.update(rows=rows if rows > 0 else 24, cols=cols if cols > 0 else 80)
        r = self._interactive("exec_tty", params, stdin, {"exec_tty.stdout": stdout}, resize,
                              timeout)
        return ExecInteractiveResult(int(r["exit_code"]), int(r.get("duration_ms") or 0))

    # --- files and logs ------------------------------------------------------------------

    def write_file(self, path: str, content: bytes | str, mode: int = 0o644,
                   timeout: float | None = None) -> None:
        """Write a file (parents created, atomically, as root). Any size: above 1 MiB the
        content is streamed in chunks (`write_file_from`)."""
        data = content.encode() if isinstance(content, str) else content
        if len(data) > F.SMALL_WRITE:
            self.write_file_from(path, data, mode, timeout)
            return
        self._proc.call("write_file", {"path": path,
                                       "content": base64.b64encode(data).decode(),
                                       "mode": mode}, timeout=timeout)

    def write_file_from(self, path: str, source: bytes | IO[Any], mode: int = 0o644,
                        timeout: float | None = None) -> int:
        """Stream `source` (bytes or a file-like object, read to its end) into a file; the
        number of bytes written. The file appears only once all of it arrived; a failure or
        cancellation leaves the previous file (or none)."""
        rpc = self._proc
        deadline = None if timeout is None else time.monotonic() + timeout
        via_fd = rpc.has_data_channel
        params: dict[str, Any] = {"path": path, "mode": mode}
        ready = threading.Event()
        if via_fd:
            params["via"] = "fd"
        req_id, pending = rpc.begin("write_file_stream", params,
                                    lambda method, _p: ready.set())
        try:
            # Over the data channel the content may only come once the server listens for
            # it (JSON lines are ordered after the request anyway).
            while via_fd and not ready.wait(0.05) and not pending.done.is_set():
                if deadline is not None and time.monotonic() > deadline:
                    break
            for chunk in F.chunks_of(source):
                if pending.done.is_set():
                    break  # answered early (an error): finish() raises it
                if deadline is not None and time.monotonic() > deadline:
                    break  # finish() times out and cancels
                if via_fd:
                    rpc.send_data(req_id, chunk)
                else:
                    rpc.send("write_file_stream.data", F.data_params(req_id, chunk))
            else:
                if via_fd:
                    rpc.send_data(req_id, b"")
                else:
                    rpc.send("write_file_stream.end", {"id": req_id})
        except BaseException:  # the source failed, or Ctrl-C: the guest drops the file
            rpc.send("cancel", {"id": req_id})
            rpc.forget(req_id)
            raise
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        r = rpc.finish("write_file_stream", req_id, pending, left)
        return int(r.get("size") or 0) if isinstance(r, dict) else 0

    def read_file(self, path: str, timeout: float | None = None,
                  limit: int | None = None) -> bytes:
        """A regular file's content, any size (streamed in chunks). `limit`: fail (`RPCError`
        -32002) rather than hold more than that many bytes (the guest decides what a file
        holds)."""
        parts: list[bytes] = []
        self._read_stream(path, parts.append, timeout, limit)
        return b"".join(parts)

    def read_file_to(self, path: str, writer: IO[Any], timeout: float | None = None,
                     limit: int | None = None) -> int:
        """Stream a file into a binary writer, a chunk at a time; the number of bytes.
        `limit`: fail (`RPCError` -32002) rather than take more than that many bytes."""
        return self._read_stream(path, writer.write, timeout, limit)

    def _read_stream(self, path: str, sink: Callable[[bytes], Any], timeout: float | None,
                     limit: int | None) -> int:
        failure: list[BaseException] = []

        def on(method: str, params: dict[str, Any]) -> None:
            if method == "read_file_stream.data" and not failure:
                try:
                    raw = params["data"]
                    sink(raw if isinstance(raw, bytes) else F.decode_data(params))
                except BaseException as e:  # the writer failed: stop the transfer
                    failure.append(e)
                    self._proc.send("cancel", {"id": req_id})

        def raw_sink(data: bytes) -> None:  # content on the data channel
            on("read_file_stream.data", {"data": data})

        params: dict[str, Any] = {"path": path}
        if limit is not None:
            params["limit"] = limit
        rpc = self._proc
        via_fd = rpc.has_data_channel
        if via_fd:
            params["via"] = "fd"
        deadline = None if timeout is None else time.monotonic() + timeout
        req_id, pending = rpc.begin("read_file_stream", params, on,
                                    raw_sink if via_fd else None)
        try:
            r = rpc.finish("read_file_stream", req_id, pending, timeout, keep=via_fd)
            if via_fd:
                # The server ended the content before it answered; it may still be in the
                # pipe behind us.
                left = None if deadline is None else max(0.1, deadline - time.monotonic())
                if not pending.data_end.wait(left):
                    raise TimeoutError(f"request read_file_stream (id={req_id}) timed out "
                                       f"after {timeout}s")
        except BaseException:
            if failure:
                raise failure[0] from None
            raise
        finally:
            rpc.forget(req_id)
        if failure:
            raise failure[0]
        return int(r.get("size") or 0) if isinstance(r, dict) else 0

    def list_files(self, path: str, timeout: float | None = None) -> list[FileInfo]:
        return P.file_infos(self._proc.call("list_files", {"path": path}, timeout=timeout))

    def log(self, timeout: float | None = None) -> str:
        return P.b64text(self._proc.call("log", timeout=timeout)["content"])

    def log_stream(self, stdout: IO[Any] | None = None, timeout: float | None = None) -> None:
        def on(method: str, params: dict[str, Any]) -> None:
            if method == "log_stream.data":
                emit(stdout, base64.b64decode(str(params.get("data", ""))))

        self._proc.call("log_stream", None, on, timeout)
