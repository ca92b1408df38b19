"""Build the guest agent: a static musl binary, cached by the hash of its sources.

The agent (``guest/agent/*.c``) is PID 1 of every microVM and the guest has no Python, so it
is C, compiled on the host with musl-gcc. ``$MATCHLOCK_AGENT`` overrides the build entirely.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from matchlock.errors import MatchlockError, SetupMissing
from matchlock.paths import cache_dir

AGENT_DIR = Path(__file__).resolve().parent / "agent"
AGENT_NAME = "matchlock-agent"
COMPILER = "musl-gcc"
CFLAGS = ("-std=c11", "-static", "-O2", "-s", "-Wall", "-Wextra", "-Werror")
_BUILD_TIMEOUT = 300


def agent_sources() -> list[Path]:
    """The agent's C sources and headers, in a stable order."""
    return sorted(p for p in AGENT_DIR.iterdir() if p.suffix in {".c", ".h"} and p.is_file())


def agent_key() -> str:
    """Short content hash of the sources, the compiler version and the flags."""
    h = hashlib.sha256()
    for src in agent_sources():
        h.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    # The compiler's version is left out: asking it costs a subprocess on every `run`, and a
    # binary from an older musl-gcc is just as good.
    h.update(" ".join(CFLAGS).encode())
    return h.hexdigest()[:16]


def _cache_path(key: str) -> Path:
    return cache_dir() / "agent" / key / AGENT_NAME


def cached_agent() -> Path | None:
    """``$MATCHLOCK_AGENT`` if set (used as is), else the built agent for the current sources."""
    override = os.environ.get("MATCHLOCK_AGENT")
    if override:
        return Path(override)
    path = _cache_path(agent_key())
    return path if path.is_file() else None


def build_agent(log: Callable[[str], None]) -> Path:
    """Build the agent into the cache unless it is there already; return its path.

    Concurrent builds serialize on a lock file, and the binary appears by an atomic rename, so
    nobody ever sees a half-written agent. Compiler output goes to ``log`` line by line.
    """
    cc = shutil.which(COMPILER)
    if cc is None:
        raise SetupMissing(
            "musl-gcc not found (it builds the guest agent)", hint="apt-get install musl-tools"
        )
    out = _cache_path(agent_key())
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.is_file():
            return out
        log(f"building the guest agent with {COMPILER} -> {out}")
        tmp = out.with_name(f".{AGENT_NAME}.{os.getpid()}.tmp")
        sources = [str(p) for p in agent_sources() if p.suffix == ".c"]
        try:
            try:
                proc = subprocess.run(
                    [cc, *CFLAGS, "-o", str(tmp), *sources],
                    capture_output=True,
                    text=True,
                    timeout=_BUILD_TIMEOUT,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise MatchlockError(
                    f"building the guest agent timed out after {_BUILD_TIMEOUT} s"
                ) from None
            output = (proc.stdout + proc.stderr).splitlines()
            for line in output:
                log(line)
            if proc.returncode != 0:
                first = next((ln for ln in output if "error" in ln), None)
                raise MatchlockError(
                    f"building the guest agent failed: {first or f'exit status {proc.returncode}'}",
                    hint="the compiler output is in the log above",
                )
            tmp.chmod(0o755)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return out
