"""A booted sandbox that tests exec commands in, through the sandbox API (no CLI process per
command, so one boot serves a whole module)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from matchlock.guest.client import Output
from matchlock.guest.protocol import ExecRequest, ExitStatus
from matchlock.image.resolve import resolve_image
from matchlock.sandbox.core import Sandbox, SandboxOptions
from matchlock.sandbox.network import Egress


@dataclass
class Guest:
    sandbox: Sandbox
    env: list[str]

    def exec(self, argv: list[str], *, cwd: str = "/tmp", privileged: bool = False,
             timeout: float = 60) -> tuple[int, str, str]:
        ex = self.sandbox.exec(ExecRequest(argv=argv, env=self.env, cwd=cwd, user="root",
                                           privileged=privileged))
        out, err = bytearray(), bytearray()
        code = -1
        deadline = time.monotonic() + timeout
        for ev in ex.events():
            if isinstance(ev, Output):
                (out if ev.stream == "stdout" else err).extend(ev.data)
            elif isinstance(ev, ExitStatus):
                code = ev.code
            assert time.monotonic() < deadline
        return code, out.decode(errors="replace"), err.decode(errors="replace")

    def run(self, script: str, timeout: float = 60) -> tuple[int, str, str]:
        """A Python script (images that have python3)."""
        return self.exec(["python3", "-c", script], timeout=timeout)

    def sh(self, script: str, *, privileged: bool = False,
           timeout: float = 120) -> tuple[int, str, str]:
        return self.exec(["sh", "-c", script], cwd="/", privileged=privileged, timeout=timeout)


@contextmanager
def booted(image: str | None, egress: Egress | None) -> Iterator[Guest]:
    """A started sandbox of `image`; its env is the image's plus the egress's (placeholders,
    CA bundle variables)."""
    resolved = resolve_image(image)
    sb = Sandbox(SandboxOptions(image=resolved.name, rootfs=resolved.rootfs, egress=egress))
    with sb:
        sb.start()
        extra = [] if egress is None else [f"{k}={v}" for k, v in egress.guest_env().items()]
        yield Guest(sb, [*resolved.config.env, *extra])
