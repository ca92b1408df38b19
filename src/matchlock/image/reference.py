"""Image references with Docker's conventions (`busybox` = `docker.io/library/busybox:latest`).

Grammar (distribution/reference):
    reference := name [ ":" tag ] [ "@" digest ]
    name      := [ domain "/" ] path-component ( "/" path-component )*
    domain    := host [ ":" port ]
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from matchlock.errors import ImageError

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
# Docker Hub is known under several names; they all mean the same repositories.
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_NAME_MAX = 255

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST_RE = re.compile(rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_PATH_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Reference:
    """A parsed, normalized image reference. `tag` is None only when a digest pins the image."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        """`registry/repository`, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def canonical(self) -> str:
        """The fully qualified form, e.g. `docker.io/library/busybox:latest`."""
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    def __str__(self) -> str:
        return self.canonical


def _bad(text: str, why: str) -> ImageError:
    return ImageError(
        f"invalid image reference {text!r}: {why}",
        hint="use NAME[:TAG][@sha256:DIGEST], e.g. busybox, alpine:3.20 or "
        "127.0.0.1:5000/team/app:v1",
    )


def _valid_domain(domain: str) -> bool:
    host, port = domain, None
    if domain.startswith("["):
        # Bracketed IPv6 literal, optionally followed by :port.
        end = domain.find("]")
        if end < 0:
            return False
        host, rest = domain[1:end], domain[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                return False
            port = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
    else:
        if ":" in domain:
            host, port = domain.split(":", 1)
        if not _HOST_RE.fullmatch(host):
            return False
    return port is None or (_PORT_RE.fullmatch(port) is not None and int(port) <= 65535)


def _split_domain(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    # Docker's rule: the first component is a registry only if it looks like a host name
    # (has a dot or a port, is localhost, or has upper case, which repositories never do).
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        return first, rest
    return DEFAULT_REGISTRY, name


def parse_reference(text: str) -> Reference:
    """Parse and normalize `text`; raise ImageError if it is not a valid reference."""
    if not isinstance(text, str) or not text:
        raise _bad(str(text), "it is empty")
    if text != text.strip() or any(c.isspace() for c in text):
        raise _bad(text, "it contains white space")

    remainder, at, digest = text.partition("@")
    if at and not _DIGEST_RE.fullmatch(digest):
        raise _bad(text, "the digest must be 'sha256:' and 64 lowercase hex digits")
    tag: str | None = None
    colon = remainder.rfind(":")
    if colon > remainder.rfind("/"):
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise _bad(text, f"tag {tag!r} is not valid (letters, digits, '_', '.', '-'; max 128)")

    domain, path = _split_domain(remainder)
    if not _valid_domain(domain):
        raise _bad(text, f"registry {domain!r} is not a valid host[:port]")
    if domain in _DOCKER_HUB_ALIASES:
        domain = DEFAULT_REGISTRY
        if "/" not in path:
            path = f"library/{path}"
    if not path:
        raise _bad(text, "the repository name is empty")
    for component in path.split("/"):
        if not _PATH_COMPONENT_RE.fullmatch(component):
            raise _bad(
                text,
                f"repository component {component!r} must be lowercase letters and digits "
                "joined by '.', '_', '__' or '-'",
            )
    if len(domain) + 1 + len(path) > _NAME_MAX:
        raise _bad(text, f"the name is longer than {_NAME_MAX} characters")

    if tag is None and not at:
        tag = DEFAULT_TAG
    return Reference(registry=domain, repository=path, tag=tag, digest=digest if at else None)
