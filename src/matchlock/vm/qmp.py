"""A minimal QMP client over a socket QEMU was handed at start (no socket file to leak)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Sequence
from typing import Any

from matchlock.errors import MatchlockError

_MAX_LINE = 1 << 20


class QmpError(MatchlockError):
    """QEMU refused a command or stopped answering."""


class Qmp:
    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._timeout = timeout
        self._read_message()  # the greeting
        self.command("qmp_capabilities")

    def _read_message(self) -> dict[str, Any]:
        deadline = time.monotonic() + self._timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError("QEMU did not answer on its control socket")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                raise QmpError(f"QEMU control socket failed: {e}") from None
            if not chunk:
                raise QmpError("QEMU closed its control socket")
            self._buf += chunk
            if len(self._buf) > _MAX_LINE:
                raise QmpError("oversized message on the QEMU control socket")
        line, _, rest = self._buf.partition(b"\n")
        self._buf = bytearray(rest)
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise QmpError("malformed message on the QEMU control socket")
        return msg

    def command(self, name: str, *, fds: Sequence[int] = (), **arguments: Any) -> Any:
        """Run a command; `fds` travel with it as SCM_RIGHTS (for `getfd`)."""
        payload: dict[str, Any] = {"execute": name}
        if arguments:
            payload["arguments"] = arguments
        data = json.dumps(payload).encode() + b"\n"
        try:
            if fds:
                # QEMU attaches the descriptors to the command read with them: one message.
                sent = socket.send_fds(self._sock, [data], list(fds))
                self._sock.sendall(data[sent:])
            else:
                self._sock.sendall(data)
        except OSError as e:
            # QEMU exited (e.g. a snapshot it could not load): EPIPE must not escape, click
            # would turn it into a silent exit 1.
            raise QmpError(f"QEMU control socket failed: {e}") from None
        while True:
            msg = self._read_message()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                err = msg["error"]
                raise QmpError(f"QEMU refused {name}: {err.get('desc', err)}")
            # Anything else is an asynchronous event; nothing here needs them.

    def send_fd(self, name: str, fd: int) -> None:
        """Hand QEMU a descriptor under `name` (QMP getfd), e.g. for `migrate "fd:NAME"`: a
        confined VMM opens nothing by path."""
        self.command("getfd", fds=[fd], fdname=name)

    def close(self) -> None:
        self._sock.close()
