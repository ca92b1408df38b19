"""SDK-local network hooks: a unix socket in a private temporary directory on which the
sandbox's proxy asks this process what to do with a matching request (one JSON line in, one
JSON object out)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from matchlock.sdk.types import (
    NetworkHookRequest,
    NetworkHookResult,
    NetworkHookRule,
)

Hook = Callable[[NetworkHookRequest], NetworkHookResult | None]
MAX_REQUEST = 4 << 20


def _str_map(v: Any) -> dict[str, str] | None:
    return {str(k): str(x) for k, x in v.items()} if isinstance(v, dict) else None


def _multi_map(v: Any) -> dict[str, list[str]] | None:
    if not isinstance(v, dict):
        return None
    return {str(k): [str(x) for x in x_] if isinstance(x_, list) else [str(x_)]
            for k, x_ in v.items()}


def result_to_wire(result: NetworkHookResult | None) -> dict[str, Any]:
    if result is None:
        return {}
    if not isinstance(result, NetworkHookResult):
        raise TypeError("a network hook returns NetworkHookResult or None")
    out: dict[str, Any] = {}
    if result.action:
        out["action"] = str(result.action)
    if result.request is not None:
        req: dict[str, Any] = {}
        if result.request.headers is not None:
            req["headers"] = _multi_map(result.request.headers)
        if result.request.query is not None:
            req["query"] = _str_map(result.request.query)
        if result.request.path:
            req["path"] = result.request.path
        if req:
            out["request"] = req
    if result.response is not None:
        resp: dict[str, Any] = {}
        if result.response.headers is not None:
            resp["headers"] = _multi_map(result.response.headers)
        if result.response.body_replacements:
            resp["body_replacements"] = [b.to_dict() for b in result.response.body_replacements]
        body = result.response.set_body
        if body is not None:
            raw = body.encode() if isinstance(body, str) else bytes(body)
            resp["set_body_base64"] = base64.b64encode(raw).decode("ascii")
        if resp:
            out["response"] = resp
    return out


def answer(hooks: dict[str, tuple[str, Hook]], line: bytes) -> dict[str, Any]:
    """The reply to one callback request (pure apart from calling the hook)."""
    try:
        payload = json.loads(line)
        if not isinstance(payload, dict):
            raise ValueError("a callback request is a JSON object")
    except ValueError as e:
        return {"error": str(e)}
    phase = str(payload.get("phase", "")).strip().lower()
    entry = hooks.get(str(payload.get("callback_id", "")).strip())
    if entry is None:
        return {"error": "network hook callback not found"}
    want, hook = entry
    if want and want != phase:
        return {"error": "network hook phase mismatch"}
    req = NetworkHookRequest(
        phase=phase if phase in ("before", "after") else "",  # type: ignore[arg-type]
        host=str(payload.get("host", "")), method=str(payload.get("method", "")),
        path=str(payload.get("path", "")), query=_str_map(payload.get("query")),
        request_headers=_multi_map(payload.get("request_headers")),
        status_code=int(payload.get("status_code") or 0),
        response_headers=_multi_map(payload.get("response_headers")),
        is_sse=bool(payload.get("is_sse")))
    try:
        return result_to_wire(hook(req))
    except Exception as e:  # the hook is the user's code: report, never crash the server
        return {"error": f"{type(e).__name__}: {e}"}


class HookServer:
    def __init__(self, rules: list[NetworkHookRule], ids: list[str]) -> None:
        self.hooks = {cid: ((r.phase or "").strip().lower(), r.hook)
                      for cid, r in zip(ids, rules, strict=True) if r.hook is not None}
        self._dir = tempfile.mkdtemp(prefix="matchlock-network-hook-")
        self.path = os.path.join(self._dir, "hook.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(64)
        threading.Thread(target=self._accept, name="matchlock-hooks", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            buf = b""
            while b"\n" not in buf and len(buf) < MAX_REQUEST:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                buf += chunk
            if buf:
                reply = answer(self.hooks, buf.split(b"\n", 1)[0])
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)
