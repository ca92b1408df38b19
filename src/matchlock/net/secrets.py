"""Secrets: the guest sees a placeholder, the proxy swaps in the value for the secret's hosts.

Pure (no I/O). A value must never appear in an exception message, a repr or a log line: every
error here names the secret, never its value, and `Secret.__repr__` hides it.

CLI forms (`--secret`):
    NAME@host[,host…]          value from the host's environment variable NAME
    NAME=VALUE@host[,host…]    split at the LAST `@` (a value may contain `@` and `,`)
"""

from __future__ import annotations

import re
import secrets as _random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from matchlock.net.masking import PlaceholderScanner, ValueMask
from matchlock.net.policy import HostGlob, normalize_name

PREFIX = "SANDBOX_SECRET_"
# Responses are masked for values (net/masking.py); a shorter value would also match ordinary
# data and framing, so it could not be masked without corrupting traffic: refused instead.
MIN_VALUE_LENGTH = 8
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PLACEHOLDER = re.compile(r"^[A-Za-z0-9_]{16,128}$")
# Bytes that cannot appear raw in a request target; they are percent-encoded there.
_TARGET_SAFE = frozenset(range(0x21, 0x7F)) - frozenset(b'"<>\\^`{|}#')
_USAGE = "expected --secret NAME@host[,host…] or NAME=VALUE@host[,host…]"


def new_placeholder() -> str:
    return PREFIX + _random.token_hex(16)


@dataclass(frozen=True, slots=True, repr=False, eq=False)
class Secret:
    """One secret. `hosts` are host globs (policy.HostGlob syntax, no ports)."""

    name: str
    value: str
    hosts: tuple[str, ...]
    placeholder: str

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"secret name {self.name!r} is not a valid environment variable name")
        if not self.value:
            raise ValueError(f"secret {self.name} has an empty value")
        if len(self.value) < MIN_VALUE_LENGTH:
            raise ValueError(
                f"secret {self.name}: the value has {len(self.value)} characters, at least "
                f"{MIN_VALUE_LENGTH} are needed (a shorter value cannot be kept out of responses "
                "without corrupting ordinary data)"
            )
        if any(c in self.value for c in "\r\n\0"):
            # Substituted into header lines: a line break would let the value forge headers.
            raise ValueError(f"the value of secret {self.name} contains a line break or NUL")
        if not self.hosts:
            raise ValueError(f"secret {self.name} needs at least one host (NAME@host)")
        if not _PLACEHOLDER.match(self.placeholder) or self.placeholder in self.value:
            raise ValueError(f"secret {self.name}: invalid placeholder")
        for host in self.hosts:
            if ":" in host:
                raise ValueError(f"secret {self.name}: host {host!r} must not have a port")
            HostGlob(host)  # validates

    def __repr__(self) -> str:
        return f"Secret(name={self.name!r}, hosts={self.hosts!r}, value=<hidden>)"

    __str__ = __repr__


def make_secret(name: str, value: str, hosts: Iterable[str], placeholder: str = "") -> Secret:
    return Secret(name, value, tuple(h.strip() for h in hosts), placeholder or new_placeholder())


def parse_secret(spec: str, environ: Mapping[str, str]) -> Secret:
    """Parse one `--secret` value. Error messages may name the secret, never echo the spec."""
    left, at, hosts_text = spec.rpartition("@")
    if not at:
        raise ValueError(f"--secret: {_USAGE}")
    name, eq, value = left.partition("=")
    if not _NAME.match(name):
        raise ValueError(f"--secret: the part before '=' or '@' is not a variable name; {_USAGE}")
    hosts = [h.strip() for h in hosts_text.split(",") if h.strip()]
    if not hosts:
        raise ValueError(f"--secret {name}: no host after '@'; {_USAGE}")
    if not eq:
        value = environ.get(name, "")
        if not value:
            # Not named in the message: `--secret VALUE@host` (the name forgotten) is a common
            # slip, and then the "name" is the secret itself.
            raise ValueError(
                f"--secret …@{hosts_text.strip()}: the host variable it names is not set or empty "
                "(NAME@host takes the value from $NAME; check the spelling, or use "
                "--secret-file NAME=PATH@host)"
            )
    elif not value:
        raise ValueError(f"--secret {name}=…: empty value")
    for host in hosts:
        try:
            if ":" in host:
                raise ValueError("port")
            HostGlob(host)
        except ValueError:
            # Not quoted: with `@host` forgotten, the text after the last `@` is the end of
            # the value.
            raise ValueError(
                f"--secret {name}: what follows the last '@' is not a list of host names "
                "(no ports, no addresses); expected NAME[=VALUE]@host[,host…]"
            ) from None
    return make_secret(name, value, hosts)


@dataclass(frozen=True, slots=True)
class SecretLeak:
    """A placeholder was headed to a host its secret is not valid for."""

    secret_name: str
    hosts: tuple[str, ...]

    @property
    def reason(self) -> str:
        return (
            f"secret placeholder of {self.secret_name} sent to a host it is not valid for "
            f"(--secret {self.secret_name}@{','.join(self.hosts)})"
        )


class _Compiled:
    __slots__ = ("globs", "placeholder", "secret", "target_value", "value")

    def __init__(self, secret: Secret) -> None:
        self.secret = secret
        self.placeholder = secret.placeholder.encode()
        self.value = secret.value.encode()
        self.target_value = b"".join(
            bytes([b]) if b in _TARGET_SAFE else b"%%%02X" % b for b in self.value
        )
        self.globs = tuple(HostGlob(h) for h in secret.hosts)

    def valid_for(self, host: str) -> bool:
        return any(glob.matches(host) for glob in self.globs)


# Dropped from a request that carries a value, so an echo comes back in bytes a mask can
# read: no compressed body, no compressed WebSocket messages.
_COMPRESSION_OFFERS = re.compile(
    rb"(?im)^(?:accept-encoding|sec-websocket-extensions):[^\r\n]*\r\n"
)


class SecretSet:
    """The secrets of one sandbox, applied to outgoing request heads."""

    def __init__(self, secrets: Iterable[Secret] = ()) -> None:
        items = list(secrets)
        names = [s.name for s in items]
        if len(set(names)) != len(names):
            raise ValueError("a secret name is given more than once")
        self._items = tuple(_Compiled(s) for s in items)
        self._by_host: dict[str, tuple[tuple[_Compiled, ...], tuple[_Compiled, ...]]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"SecretSet({[c.secret.name for c in self._items]!r})"

    def mask(self) -> ValueMask | None:
        """A fresh mask for one response, or None when there is nothing to hide."""
        if not self._items:
            return None
        return ValueMask(v for c in self._items for v in (c.value, c.target_value))

    def scanner(self) -> PlaceholderScanner | None:
        """A fresh placeholder scanner for one raw connection, or None without secrets."""
        if not self._items:
            return None
        return PlaceholderScanner({c.placeholder: c.secret.name for c in self._items})

    def guest_env(self) -> dict[str, str]:
        """What the guest gets as environment: NAME → placeholder."""
        return {c.secret.name: c.secret.placeholder for c in self._items}

    def _split(self, host: str) -> tuple[tuple[_Compiled, ...], tuple[_Compiled, ...]]:
        """(secrets valid for `host`, secrets not valid for it), cached per host name."""
        cached = self._by_host.get(host)
        if cached is None:
            norm = normalize_name(host)
            valid = tuple(c for c in self._items if norm is not None and c.valid_for(norm))
            other = tuple(c for c in self._items if c not in valid)
            cached = (valid, other)
            if len(self._by_host) > 4096:  # bounded: hosts come from the guest
                self._by_host.clear()
            self._by_host[host] = cached
        return cached

    def substitute_head(self, head: bytes, host: str) -> bytes | SecretLeak:
        """Swap placeholders in an HTTP/1 request head bound for `host` (the verified name).

        The first line is the request line: there the value is percent-encoded where it holds
        bytes a request target cannot carry. Header lines get the value as is.
        """
        if not self._items:
            return head
        valid, other = self._split(host)
        for c in other:
            if c.placeholder in head:
                return SecretLeak(c.secret.name, c.secret.hosts)
        present = [c for c in valid if c.placeholder in head]
        if not present:
            return head
        line_end = head.find(b"\r\n")
        line, rest = (head, b"") if line_end < 0 else (head[:line_end], head[line_end:])
        for c in present:
            line = line.replace(c.placeholder, c.target_value)
            rest = rest.replace(c.placeholder, c.value)
        return line + rest

    def inject(self, head: bytes, host: str) -> bytes | SecretLeak:
        """`substitute_head`, and when a value went in, no compressed response (nor WebSocket
        compression): an origin that echoes the request must answer in plain bytes, which the
        response mask can see."""
        out = self.substitute_head(head, host)
        if isinstance(out, bytes) and out != head:
            out = _COMPRESSION_OFFERS.sub(b"", out)
        return out

    def substitute_value(
        self, value: bytes, host: str, *, target: bool = False
    ) -> bytes | SecretLeak:
        """The same for one field (an HTTP/2 header value, or `:path` with target=True)."""
        if not self._items:
            return value
        valid, other = self._split(host)
        for c in other:
            if c.placeholder in value:
                return SecretLeak(c.secret.name, c.secret.hosts)
        for c in valid:
            if c.placeholder in value:
                value = value.replace(c.placeholder, c.target_value if target else c.value)
        return value
