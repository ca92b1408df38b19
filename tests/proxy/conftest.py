"""Fixtures for the proxy's loopback tests (no VM, no outside address)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from proxy_testutil import Rig


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    r = Rig(tmp_path_factory.mktemp("proxy"), request.param)
    yield r
    r.close()
