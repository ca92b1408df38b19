"""What a guest connection was headed for, as the host understands it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """The destination of one accepted guest TCP connection.

    `address`/`port` are what the guest dialled (from SO_ORIGINAL_DST). `name` is the host name
    the guest resolved through the sandbox's DNS to get that address, or None when the address
    did not come from our resolver (an IP literal, a hard-coded or spoofed address): the policy
    refuses those except in open mode.
    """

    name: str | None
    address: str
    port: int
