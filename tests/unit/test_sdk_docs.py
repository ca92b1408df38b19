"""docs/sdk.md stays complete: every public method of the SDK's clients and builder, and every
exported name, is documented; AsyncClient offers every method Client does."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import matchlock.sdk as sdk
from matchlock.sdk import AsyncClient, Client, Sandbox

DOC = (Path(__file__).resolve().parents[2] / "docs" / "sdk.md").read_text()


def public(cls: type) -> set[str]:
    return {n for n, _ in inspect.getmembers(cls) if not n.startswith("_")}


def test_every_client_and_builder_method_is_documented() -> None:
    missing = [f"{cls.__name__}.{name}" for cls in (Client, Sandbox)
               for name in sorted(public(cls)) if not re.search(rf"`{name}\(|`{name}`", DOC)]
    assert missing == []


def test_every_exported_type_is_documented() -> None:
    names = [n for n in sdk.__all__ if not n.isupper()]
    assert [n for n in names if n not in DOC] == []
    assert "VFS_HOOK_*" in DOC and "NETWORK_HOOK_*" in DOC


def test_async_client_mirrors_client() -> None:
    assert public(Client) - public(AsyncClient) == set()
    for name in public(Client) - {"vm_id"}:
        sync, aio = getattr(Client, name), getattr(AsyncClient, name)
        assert inspect.iscoroutinefunction(aio), name
        assert (list(inspect.signature(sync).parameters)
                == list(inspect.signature(aio).parameters)), name
