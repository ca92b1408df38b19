"""A raw JSON-RPC client for `matchlock rpc` (no SDK): lines in, lines out, with a reader
thread so that tests can interleave requests, notifications and answers."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from .conftest import MATCHLOCK, leftovers

BUILTIN = "matchlock-builtin:busybox"


class Rpc:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [MATCHLOCK, "rpc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env or os.environ.copy())
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.raw: list[bytes] = []
        self.stderr = b""
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.raw.append(line)
            self.lines.put(json.loads(line))  # every line must be JSON
        self.lines.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, method: str, params: Any = None, rid: int | None = None) -> None:
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if rid is not None:
            msg["id"] = rid
        if params is not None:
            msg["params"] = params
        self.send_raw((json.dumps(msg) + "\n").encode())

    def next(self, timeout: float = 60) -> dict[str, Any]:
        msg = self.lines.get(timeout=timeout)
        assert msg is not None, f"rpc ended; stderr: {self.stderr.decode(errors='replace')}"
        return msg

    def until(self, rid: int, timeout: float = 120) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The answer to `rid`, and every message that came before it."""
        before = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next(max(0.1, deadline - time.monotonic()))
            if msg.get("id") == rid and "method" not in msg:
                return msg, before
            before.append(msg)

    def call(self, method: str, params: Any = None, rid: int = 1,
             timeout: float = 120) -> dict[str, Any]:
        self.send(method, params, rid)
        return self.until(rid, timeout)[0]

    def create(self, params: dict[str, Any] | None = None, rid: int = 1) -> str:
        answer = self.call("create", {"image": BUILTIN, **(params or {})}, rid)
        assert "result" in answer, answer
        return str(answer["result"]["id"])

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def finish(self, timeout: float = 30) -> int:
        with_stdin = self.proc.stdin
        if with_stdin is not None and not with_stdin.closed:
            with_stdin.close()
        return self.proc.wait(timeout)


def wait_no_leftovers(state_dir: Path, timeout: float = 15) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = leftovers(state_dir)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def error(answer: dict[str, Any]) -> tuple[int, str]:
    assert "error" in answer, answer
    return answer["error"]["code"], answer["error"]["message"]
