"""`Pool`: N sandboxes of one configuration kept ready, so that `launch` returns at once.

    pool = Pool(Sandbox("python:3.12-alpine").allow_host("x.example"), size=2)
    with pool:
        with Client(pool=pool) as client:
            client.launch(Sandbox("python:3.12-alpine").allow_host("x.example"))  # pooled

Each member is a `matchlock rpc` child that already ran `create` (a sandbox of its own: id,
hostname, CA, network namespace, RNG seeded from fresh host entropy) and was then paused
(`pause`: QEMU `stop`, no CPU used). A `create`/`launch` whose configuration is exactly the
pool's takes a member, resumes it (`resume`: the guest's wall clock is set again and fresh
entropy mixed in) and adopts its process; a background thread starts a replacement. Members
are never reused: a member handed out belongs to its client, which destroys it on `close`.

Exactly: the whole `create` request (image, resources, env, network policy with secret
values, mounts, disks, entrypoint, hostname), the port forwards and the binary must be equal.
Secret values are compared in this process's memory only. A configuration with network hook
callbacks cannot be pooled (a callback belongs to one client's socket).

When no member is ready (all taken, the replacement still starting, or the last start
failed), `launch` starts a sandbox cold, as without a pool.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from matchlock.errors import MatchlockError
from matchlock.sdk import params as P
from matchlock.sdk.builder import Sandbox
from matchlock.sdk.transport import RPCProcess
from matchlock.sdk.types import Config, CreateOptions

RESUME_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
MAX_BACKOFF_S = 30.0
PRUNE_INTERVAL_S = 1.0


@dataclass
class Member:
    rpc: RPCProcess
    vm_id: str


def default_config(config: Config | None) -> Config:
    """The caller's config, or `matchlock` ($MATCHLOCK_BIN) found on PATH."""
    return config or Config(binary_path=os.environ.get("MATCHLOCK_BIN", "matchlock"))


def command(config: Config, *args: str) -> list[str]:
    cmd = [config.binary_path, *args]
    return ["sudo", *cmd] if config.use_sudo else cmd


def spawn_rpc(config: Config,
              on_event: Callable[[dict[str, Any]], None] | None = None) -> RPCProcess:
    # The data channel's pipes cannot pass through sudo (it closes inherited
    # descriptors): streamed files then go as base64 JSON lines.
    return RPCProcess(command(config, "rpc"), on_event, data_channel=not config.use_sudo)


def config_key(config: Config | None, opts: CreateOptions) -> str:
    """What must be equal for a member to serve a request: the binary, the `create` request
    as it would be sent, and the port forwards applied after it."""
    cfg = default_config(config)
    return json.dumps({
        "binary": cfg.binary_path, "sudo": cfg.use_sudo,
        "create": P.create_params(opts, ""),
        "forwards": [[f.local_port, f.remote_port] for f in opts.port_forwards],
        "addresses": list(opts.port_forward_addresses),
    }, sort_keys=True, separators=(",", ":"))


class Pool:
    """Thread-safe. `size` members of the configuration `sandbox` (as `launch` would create
    it; `launch=False`: as `create`, without the image's entrypoint)."""

    def __init__(self, sandbox: Sandbox | CreateOptions, size: int = 1,
                 config: Config | None = None, *, launch: bool = True) -> None:
        if size < 1:
            raise MatchlockError("pool size must be at least 1")
        opts = copy.deepcopy(sandbox.options() if isinstance(sandbox, Sandbox) else sandbox)
        opts.launch_entrypoint = launch or opts.launch_entrypoint
        P.check_create(opts)
        rules = opts.network_interception.rules if opts.network_interception else []
        if any(r.hook is not None for r in rules):
            raise MatchlockError("a pool cannot hold sandboxes with network hook callbacks "
                                 "(each callback belongs to one client)")
        self.size = size
        self.config = default_config(config)
        self._params = P.create_params(opts, "")
        self._key = config_key(self.config, opts)
        self._ready: list[Member] = []
        self._making: RPCProcess | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._filler: threading.Thread | None = None
        self.last_error: BaseException | None = None
        self._failures = 0

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start filling the pool in the background (`wait_ready` waits for it)."""
        with self._cond:
            if self._closed:
                raise MatchlockError("the pool is closed")
            if self._filler is None:
                self._filler = threading.Thread(target=self._fill, name="matchlock-pool",
                                                daemon=True)
                self._filler.start()

    def close(self) -> None:
        """Destroy every member not handed out (and one being started); members handed out
        belong to their clients. Returns once their sandboxes are gone."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            members, self._ready = self._ready, []
            making = self._making
            self._cond.notify_all()
        if making is not None:
            making.terminate()  # aborts its boot; the rpc process removes the sandbox
        for m in members:
            m.rpc.shutdown(STOP_TIMEOUT_S)  # stdin EOF: the sandbox is removed completely
        if self._filler is not None:
            self._filler.join()

    def __enter__(self) -> Pool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Pool:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        import asyncio

        await asyncio.to_thread(self.close)

    @property
    def ready(self) -> int:
        with self._cond:
            return len(self._ready)

    def member_ids(self) -> list[str]:
        """The sandbox ids of the members ready now (`matchlock ls` lists them too)."""
        with self._cond:
            return [m.vm_id for m in self._ready]

    def wait_ready(self, count: int | None = None, timeout: float | None = None) -> bool:
        """Wait until `count` (default: `size`) members are ready; False on timeout, when the
        pool is closed, or as soon as a member fails to start (`last_error` says why)."""
        want = self.size if count is None else min(count, self.size)
        with self._cond:
            failures = self._failures
            self._cond.wait_for(lambda: self._closed or len(self._ready) >= want
                                or self._failures != failures, timeout)
            return not self._closed and len(self._ready) >= want

    # --- hand-out ----------------------------------------------------------------------------

    def matches(self, config: Config | None, opts: CreateOptions) -> bool:
        return config_key(config, opts) == self._key

    def take(self, config: Config | None, opts: CreateOptions) -> Member | None:
        """A resumed member for exactly this configuration, or None (not the pool's
        configuration, or no member ready): the caller then starts a sandbox cold."""
        if not self.matches(config, opts):
            return None
        while True:
            with self._cond:
                if self._closed or not self._ready:
                    return None
                member = self._ready.pop(0)
                self._cond.notify_all()  # the filler starts a replacement
            try:
                member.rpc.call("resume", timeout=RESUME_TIMEOUT_S)
                return member
            except (MatchlockError, TimeoutError) as e:
                # A member that died or cannot resume is destroyed; try the next one.
                self.last_error = e
                member.rpc.shutdown(STOP_TIMEOUT_S)

    # --- the filler ----------------------------------------------------------------------------

    def _prune(self) -> None:
        """Drop members whose rpc process died while pooled (`matchlock kill ID`, a crash):
        they are replaced. Called with the lock held."""
        dead = [m for m in self._ready if not m.rpc.alive]
        for m in dead:
            self._ready.remove(m)
            m.rpc.shutdown(0)

    def _fill(self) -> None:
        backoff = 1.0
        while True:
            with self._cond:
                while not self._closed:
                    self._prune()
                    if len(self._ready) < self.size:
                        break
                    self._cond.wait(PRUNE_INTERVAL_S)
                if self._closed:
                    return
                try:
                    rpc: RPCProcess | None = spawn_rpc(self.config)
                except OSError as e:  # no such binary
                    rpc, error = None, MatchlockError(f"cannot start matchlock rpc: {e}")
                self._making = rpc
            try:
                if rpc is None:
                    raise error
                member = self._make(rpc)
            except BaseException as e:  # reported through last_error
                if rpc is not None:
                    rpc.shutdown(STOP_TIMEOUT_S)
                with self._cond:
                    self._making = None
                    if self._closed:
                        return
                    self.last_error = e
                    self._failures += 1
                    self._cond.notify_all()
                    # A configuration that cannot start (a bad image) must not spin.
                    self._cond.wait_for(lambda: self._closed, backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            backoff = 1.0
            with self._cond:
                self._making = None
                if not self._closed:
                    self._ready.append(member)
                    self._cond.notify_all()
                    continue
            rpc.shutdown(STOP_TIMEOUT_S)
            return

    def _make(self, rpc: RPCProcess) -> Member:
        vm_id = P.created_id(rpc.call("create", copy.deepcopy(self._params)))
        rpc.call("pause", timeout=RESUME_TIMEOUT_S)
        return Member(rpc, vm_id)
