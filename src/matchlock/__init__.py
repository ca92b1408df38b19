"""matchlock: run untrusted workloads in ephemeral microVMs with host-controlled egress.

The SDK's names (`Client`, `Sandbox`, `AsyncClient`, the option and result types) are
importable from here, as from the official SDK; they load on first use, so the CLI's start-up
does not pay for them.
"""

from __future__ import annotations

# Not `from typing import TYPE_CHECKING`: every `matchlock` process imports this package, and
# `typing` costs a fresh `matchlock exec` ~4 ms. Type checkers treat any TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:  # type checkers see the real types (at run time: __getattr__)
    from typing import Any

    from matchlock.sdk import *  # noqa: F403

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    import matchlock.sdk as sdk

    if name in sdk.__all__:
        return getattr(sdk, name)
    raise AttributeError(f"module 'matchlock' has no attribute {name!r}")


def __dir__() -> list[str]:
    import matchlock.sdk as sdk

    return sorted([*globals(), *sdk.__all__])
