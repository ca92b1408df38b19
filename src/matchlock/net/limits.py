"""How many guest connections one sandbox's proxy may hold open.

Each proxied connection costs two descriptors in the owner process (guest side, upstream
side). With the common soft limit of 1,024 open files a few hundred idle guest connections
would starve the owner, so the soft limit is raised to the hard one at start, and the cap per
sandbox is what remains affordable after that, never more than the user asked for.
"""

from __future__ import annotations

import resource

DEFAULT_MAX_CONNECTIONS = 512
FDS_PER_CONNECTION = 2
RESERVED_FDS = 256  # the VMM's pipes, logs, DNS sockets, the image store, Python itself
KERNEL_HEADROOM = 32  # the firewall admits a few more, so the proxy sees and reports the excess


def raise_nofile_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_cap(requested: int, nofile: int) -> int:
    """The cap to enforce: `requested`, unless the descriptors cannot pay for it."""
    affordable = max(16, (nofile - RESERVED_FDS) // FDS_PER_CONNECTION)
    return max(1, min(requested, affordable))
