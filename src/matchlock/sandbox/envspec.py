"""`-e KEY=VALUE` / `-e KEY` entries (Docker's rules), without the image machinery so that
the `exec` client can use them."""

from __future__ import annotations

import os

from matchlock.errors import MatchlockError


def parse_env_entry(entry: str, origin: str) -> tuple[str, str]:
    name, sep, value = entry.partition("=")
    if not name or "\0" in name or any(c.isspace() for c in name):
        # Only the name is quoted: the value may be a credential.
        raise MatchlockError(f"invalid environment variable name {name!r} ({origin})",
                             hint="use KEY=VALUE or KEY")
    if "\0" in value:
        raise MatchlockError(f"environment variable {name} contains a NUL byte ({origin})")
    if not sep:
        host_value = os.environ.get(name)
        if host_value is None:
            raise MatchlockError(
                f"environment variable {name} is not set on the host ({origin})",
                hint=f"set it, or pass -e {name}=VALUE",
            )
        return name, host_value
    return name, value
