"""`AsyncClient`: the SDK for asyncio programs (agent frameworks).

Each call runs the thread-safe `Client` in a worker thread, so many awaits may be in flight
on one sandbox (the server runs them concurrently) and the event loop never blocks on the
sandbox.

    async with AsyncClient() as client:
        await client.launch(Sandbox("alpine:latest"))
        r = await client.exec("uname -a")
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable
from typing import IO, Any, TypeVar

from matchlock.sdk.builder import Sandbox
from matchlock.sdk.client import Client
from matchlock.sdk.pool import Pool
from matchlock.sdk.transport import SENT
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

T = TypeVar("T")


class AsyncClient:
    def __init__(self, config: Config | None = None, *,
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 pool: Pool | None = None) -> None:
        self.sync = Client(config, on_event=on_event, pool=pool)

    @property
    def vm_id(self) -> str | None:
        return self.sync.vm_id

    async def _run(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run a call of the sync client on a worker thread. When the awaiting task is
        cancelled (`asyncio.wait_for`, `TaskGroup` failure), the call's requests are cancelled
        in the sandbox too (an exec is killed), not left running."""
        sent: list[int] = []
        token = SENT.set(sent)  # to_thread runs fn in a copy of this context
        try:
            return await asyncio.to_thread(functools.partial(fn, *args, **kw))
        except asyncio.CancelledError:
            rpc = self.sync._rpc
            if rpc is not None:
                rpc.cancel_pending(sent)
            raise
        finally:
            SENT.reset(token)

    async def start(self) -> None:
        await self._run(self.sync.start)

    async def close(self, timeout: float = 0) -> None:
        await self._run(self.sync.close, timeout)

    async def __aenter__(self) -> AsyncClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def create(self, opts: CreateOptions | None = None) -> str:
        return await self._run(self.sync.create, opts)

    async def launch(self, sandbox: Sandbox) -> str:
        return await self._run(self.sync.launch, sandbox)

    async def exec(self, command: str, working_dir: str = "", timeout: float | None = None,
                   user: str = "") -> ExecResult:
        return await self._run(self.sync.exec, command, working_dir, timeout, user)

    async def exec_stream(self, command: str, stdout: IO[Any] | None = None,
                          stderr: IO[Any] | None = None, working_dir: str = "",
                          timeout: float | None = None, user: str = "") -> ExecStreamResult:
        return await self._run(self.sync.exec_stream, command, stdout, stderr, working_dir,
                               timeout, user)

    async def exec_pipe(self, command: str, stdin: IO[Any] | None = None,
                        stdout: IO[Any] | None = None, stderr: IO[Any] | None = None,
                        working_dir: str = "", timeout: float | None = None, user: str = ""
                        ) -> ExecPipeResult:
        return await self._run(self.sync.exec_pipe, command, stdin, stdout, stderr,
                               working_dir, timeout, user)

    async def exec_interactive(self, command: str, stdin: IO[Any] | None = None,
                               stdout: IO[Any] | None = None, working_dir: str = "",
                               rows: int = 24, cols: int = 80,
                               resize: Iterable[tuple[int, int]] | None = None,
                               timeout: float | None = None, user: str = ""
                               ) -> ExecInteractiveResult:
        return await self._run(self.sync.exec_interactive, command, stdin, stdout, working_dir,
                               rows, cols, resize, timeout, user)

    async def write_file(self, path: str, content: bytes | str, mode: int = 0o644,
                         timeout: float | None = None) -> None:
        await self._run(self.sync.write_file, path, content, mode, timeout)

    async def read_file(self, path: str, timeout: float | None = None,
                        limit: int | None = None) -> bytes:
        return await self._run(self.sync.read_file, path, timeout, limit)

    async def write_file_from(self, path: str, source: bytes | IO[Any], mode: int = 0o644,
                              timeout: float | None = None) -> int:
        return await self._run(self.sync.write_file_from, path, source, mode, timeout)

    async def read_file_to(self, path: str, writer: IO[Any], timeout: float | None = None,
                           limit: int | None = None) -> int:
        return await self._run(self.sync.read_file_to, path, writer, timeout, limit)

    async def list_files(self, path: str, timeout: float | None = None) -> list[FileInfo]:
        return await self._run(self.sync.list_files, path, timeout)

    async def log(self, timeout: float | None = None) -> str:
        return await self._run(self.sync.log, timeout)

    async def log_stream(self, stdout: IO[Any] | None = None, timeout: float | None = None
                         ) -> None:
        await self._run(self.sync.log_stream, stdout, timeout)

    async def port_forward(self, *specs: str) -> list[PortForwardBinding]:
        return await self._run(self.sync.port_forward, *specs)

    async def port_forward_with_addresses(self, addresses: list[str] | None, *specs: str
                                          ) -> list[PortForwardBinding]:
        return await self._run(self.sync.port_forward_with_addresses, addresses, *specs)

    async def allow_list_add(self, *hosts: str) -> list[str]:
        return await self._run(self.sync.allow_list_add, *hosts)

    async def allow_list_delete(self, *hosts: str) -> list[str]:
        return await self._run(self.sync.allow_list_delete, *hosts)

    async def remove(self) -> None:
        await self._run(self.sync.remove)

    async def volume_create(self, name: str, size_mb: int = 10240) -> VolumeInfo:
        return await self._run(self.sync.volume_create, name, size_mb)

    async def volume_list(self) -> list[VolumeInfo]:
        return await self._run(self.sync.volume_list)

    async def volume_remove(self, name: str) -> None:
        await self._run(self.sync.volume_remove, name)
