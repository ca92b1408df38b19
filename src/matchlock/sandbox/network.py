"""A sandbox's egress: policy, secrets, CA, proxy and the network namespace, wired together.

Everything here lives in the owning process. The guest gets a NIC into a private namespace,
the addresses of the host's listeners, placeholders instead of secret values, and the CA that
the proxy's certificates chain to.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from matchlock.errors import MatchlockError
from matchlock.net.limits import (
    DEFAULT_MAX_CONNECTIONS,
    KERNEL_HEADROOM,
    connection_cap,
    raise_nofile_limit,
)

if TYPE_CHECKING:
    from concurrent.futures import Future

    from matchlock.net.addressing import GuestConfig
    from matchlock.net.audit import AuditEvent
    from matchlock.net.hooks import HookConfig
    from matchlock.net.nic import Nic
    from matchlock.net.proxy import Proxy
    from matchlock.net.secrets import Secret
    from matchlock.net.stack import SandboxNetwork
    from matchlock.net.target import Target

# Where the guest finds our CA; the merged bundle replaces the image's own bundle as well, for
# tools that read the system path and ignore the variables.
GUEST_CA = "/etc/matchlock/ca.pem"
# The guest agent writes both at SETUP (guest/agent/setup.c, install_ca), and appends our CA
# to the image's own bundles (where images keep them is listed there).
GUEST_BUNDLE = "/etc/matchlock/ca-bundle.pem"
MAX_RUNTIME_ENTRIES = 2048  # an answer listing them all stays well under a wire frame
_HOST_HINT = "use HOST, *.DOMAIN or HOST:PORT, as for --allow-host"


@dataclass
class NetworkOptions:
    allow_hosts: list[str] = field(default_factory=list)
    allow_private: list[str] = field(default_factory=list)
    add_hosts: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)  # --secret specs
    secret_files: list[str] = field(default_factory=list)  # --secret-file specs (paths)
    upstream_ca: str | None = None
    upstream_dns: list[str] = field(default_factory=list)
    log_network: bool = False
    max_connections: int = 0  # concurrent guest connections; 0 = the default (net/limits.py)
    # Secrets given as values (the rpc server's `create`), with their placeholders.
    extra_secrets: list[Secret] = field(default_factory=list)
    on_event: Callable[[AuditEvent], None] | None = None  # also gets every audit event
    hooks: HookConfig | None = None  # network hook rules (the rpc server's `create`)


def _fail(flag: str, e: ValueError) -> MatchlockError:
    return MatchlockError(f"invalid {flag}: {e}")


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class Egress:
    """Built before the VM (so bad flags fail fast), started once the sandbox has an id."""

    def __init__(self, opts: NetworkOptions, environ: dict[str, str] | None = None) -> None:
        from matchlock.net import policy as pol
        from matchlock.net import secrets as sec
        from matchlock.net.secret_sources import parse_secret_file

        env = dict(os.environ if environ is None else environ)
        try:
            from_flags = [sec.parse_secret(s, env) for s in opts.secrets]
        except ValueError as e:
            raise _fail("--secret", e) from None
        try:
            from_files = [parse_secret_file(s) for s in opts.secret_files]
        except ValueError as e:
            raise _fail("--secret-file", e) from None
        parsed = [*from_flags, *from_files, *opts.extra_secrets]
        for s in parsed:
            if not _utf8(s.value):
                # An environment value with bytes that are not UTF-8: the encoder's own message
                # would quote one of them.
                raise MatchlockError(f"invalid --secret: the value of {s.name} is not UTF-8")
        try:
            self.secrets = sec.SecretSet(parsed)
        except ValueError as e:
            raise _fail("--secret/--secret-file", e) from None
        # Names whose value came from this process's environment (`--secret NAME@host`): the
        # caller can drop them from it, so that no child (QEMU above all) inherits the value.
        self.environ_secret_names = tuple(
            s.name for spec, s in zip(opts.secrets, from_flags, strict=True)
            if "=" not in spec.rpartition("@")[0])
        # A secret's hosts are where the user means to send it: they are allowed too.
        allow = [*opts.allow_hosts, *(h for s in parsed for h in s.hosts)]
        try:
            self.policy = pol.Policy(allow, allow_private=opts.allow_private,
                                     add_hosts=opts.add_hosts)
        except ValueError as e:
            raise _fail("--allow-host/--add-host/--allow-private-host", e) from None
        if opts.max_connections < 0:
            raise MatchlockError("invalid --max-connections: must be a positive number")
        self.max_connections = connection_cap(
            opts.max_connections or DEFAULT_MAX_CONNECTIONS, raise_nofile_limit())
        if opts.upstream_ca is not None and not Path(opts.upstream_ca).is_file():
            raise MatchlockError(f"--upstream-ca {opts.upstream_ca}: no such file")
        self.opts = opts
        self.nic: Nic | None = None
        self.network: SandboxNetwork | None = None
        self.proxy: Proxy | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._link_ready = threading.Event()
        # concurrent.futures (and the logging it imports, ~4 ms) only for a sandbox with a
        # network: `run --no-network` never builds an Egress.
        from concurrent.futures import Future

        self._proxy: Future[Proxy] = Future()
        self._ca_pem = b""
        self._log_file: IO[str] | None = None

    def guest_env(self) -> dict[str, str]:
        env = dict(self.secrets.guest_env())
        env.update({
            "SSL_CERT_FILE": GUEST_BUNDLE,
            "REQUESTS_CA_BUNDLE": GUEST_BUNDLE,
            "CURL_CA_BUNDLE": GUEST_BUNDLE,
            "PIP_CERT": GUEST_BUNDLE,
            "NODE_EXTRA_CA_CERTS": GUEST_CA,
        })
        return env

    def open_link(self) -> Nic:
        """The namespace and TAP, synchronously: the VMM must be born with its NIC."""
        from matchlock.net.nic import open_nic

        try:
            self.nic = open_nic()
        except OSError as e:
            raise MatchlockError(
                f"cannot create the sandbox network: {e.strerror or e}",
                hint="networking needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN); or use --no-network",
            ) from None
        return self.nic

    def start_services(self, sandbox_id: str, hostname: str, log_dir: Path) -> None:
        """Firewall, resolver, CA and proxy, on a thread: they cost ~130 ms of imports and key
        generation, which overlap the guest's restore and SETUP instead of delaying them.
        Stage one (firewall, resolver, listener) must be up before SETUP brings eth0 up;
        stage two (CA, proxy) before the CA is installed and the first connection is served
        (connections accepted earlier wait for it)."""
        self._thread = threading.Thread(
            target=self._start_services, args=(sandbox_id, hostname, log_dir),
            name="matchlock-egress-start", daemon=True)
        self._thread.start()

    def _start_services(self, sandbox_id: str, hostname: str, log_dir: Path) -> None:
        try:
            from matchlock.net.stack import SandboxNetwork

            assert self.nic is not None
            net = SandboxNetwork(hostname=hostname, iface=self.nic.iface,
                                 addressing=self.nic.addressing,
                                 max_connections=self.max_connections + KERNEL_HEADROOM)
            self.network = net  # owns the NIC from here on, also if start fails
            net.start(self.policy, on_socket=self._handle, nic=self.nic)
        except BaseException as e:
            self._error = e
            self._proxy.set_exception(e)
            return
        finally:
            self._link_ready.set()
        try:
            self._proxy.set_result(self._make_proxy(sandbox_id, log_dir))
        except BaseException as e:
            self._proxy.set_exception(e)

    def _make_proxy(self, sandbox_id: str, log_dir: Path) -> Proxy:
        from matchlock.net.audit import JsonLinesSink, fan_out
        from matchlock.net.certs import CertificateAuthority
        from matchlock.net.proxy import Proxy
        from matchlock.net.upstream import Upstream

        ca = CertificateAuthority.generate(sandbox_id)
        self._ca_pem = ca.ca_pem()
        self._log_file = open(log_dir / "network.log", "a")  # noqa: SIM115 - see close()
        sinks: list[Callable[[AuditEvent], None]] = [JsonLinesSink(self._log_file)]
        if self.opts.log_network:
            sinks.append(_print_event)
        if self.opts.on_event is not None:
            sinks.append(self.opts.on_event)
        upstream = Upstream(self.policy, upstream_dns=self.opts.upstream_dns,
                            upstream_ca=self.opts.upstream_ca)
        hooks = None
        if self.opts.hooks is not None and self.opts.hooks.active:
            from matchlock.net.hookrun import Hooks

            hooks = Hooks(self.opts.hooks)
        self.proxy = Proxy(self.policy, self.secrets, ca, fan_out(*sinks), upstream,
                           sandbox=sandbox_id, max_connections=self.max_connections,
                           hooks=hooks)
        return self.proxy

    async def _handle(self, sock: socket.socket, target: Target) -> None:
        import asyncio

        try:
            proxy = await asyncio.wrap_future(self._proxy)
        except BaseException:
            sock.close()
            raise
        await proxy.handle(sock, target)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the firewall and resolver run; SETUP (eth0 up) must come after."""
        if not self._link_ready.wait(timeout):
            raise MatchlockError("the sandbox network did not start in time")
        self._raise_error(self._error)

    def _wait_proxy(self, timeout: float = 30.0) -> None:
        try:
            self._proxy.result(timeout)
        except TimeoutError:  # concurrent.futures' own since 3.11
            raise MatchlockError("the sandbox proxy did not start in time") from None
        except BaseException as e:
            self._raise_error(e)

    @staticmethod
    def _raise_error(e: BaseException | None) -> None:
        if e is None:
            return
        if isinstance(e, MatchlockError):
            raise e
        raise MatchlockError(f"cannot start the sandbox network: {e}") from e

    def guest_config(self) -> GuestConfig:
        from matchlock.net.addressing import guest_config

        assert self.nic is not None
        return guest_config(self.nic.addressing)

    def proxy_ready(self) -> bool:
        """Whether ca_pem() would answer at once (or raise the proxy's failure)."""
        return self._proxy.done()

    def ca_pem(self) -> bytes:
        """The sandbox CA's certificate (PEM), once the proxy is up; SETUP hands it to the
        guest agent, which installs it alone and merged with the image's roots."""
        self._wait_proxy()
        return self._ca_pem

    # --- runtime allow-list changes (`matchlock allow-list`, the RPC server) ----------------

    def allow_list(self) -> list[str]:
        return list(self.policy.rules)

    def allow_list_add(self, hosts: Sequence[str]) -> list[str]:
        """Allow more hosts (parsed like --allow-host, all or nothing); the ones that were
        new. The resolver and the proxy read the policy on every lookup and connection, so
        nothing else needs telling."""
        items = _nonempty(hosts)
        if len(self.policy.rules) + len(items) > MAX_RUNTIME_ENTRIES:
            raise MatchlockError(f"the allow-list would exceed {MAX_RUNTIME_ENTRIES} entries",
                                 hint="use wildcards (*.example.com) for many names")
        try:
            return self.policy.add(items)
        except ValueError as e:
            raise MatchlockError(f"invalid host: {e}", hint=_HOST_HINT) from None

    def allow_list_delete(self, hosts: Sequence[str]) -> list[str]:
        """Stop allowing hosts; the ones that were present. New lookups, connections and
        requests (also on kept-alive connections) are refused at once; open tunnels (raw
        TCP, WebSocket) and HTTP exchanges in flight to what is no longer allowed are cut.
        Not to be called from the network loop's own thread (it waits for that loop)."""
        try:
            removed = self.policy.remove(_nonempty(hosts))
        except ValueError as e:
            raise MatchlockError(f"invalid host: {e}", hint=_HOST_HINT) from None
        proxy, network = self.proxy, self.network
        if removed and proxy is not None and network is not None:
            import asyncio

            async def revoke() -> int:
                return proxy.revoke()

            try:
                asyncio.run_coroutine_threadsafe(revoke(), network.loop).result(timeout=5)
            except (TimeoutError, RuntimeError) as e:
                raise MatchlockError(f"removed {', '.join(removed)}, but open connections "
                                     f"could not be cut: {e or 'timed out'}") from None
        return removed

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join(10)
        if self.proxy is not None and self.network is not None:
            import asyncio

            # Cancels the proxy's own tasks, so stopping the loop abandons none of them.
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.proxy.aclose(),
                                                 self.network.loop).result(timeout=2)
        if self.network is not None:
            self.network.close()
            self.network = None
        elif self.nic is not None:
            self.nic.close()
        self.nic = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def _nonempty(hosts: Sequence[str]) -> list[str]:
    from matchlock.net.policy import split_specs

    items = split_specs(hosts)
    if not items:
        raise MatchlockError("no host given", hint="give HOST[,HOST...]")
    return items


def _print_event(event: AuditEvent) -> None:
    print(f"matchlock: net {event.summary()}", file=sys.stderr, flush=True)
