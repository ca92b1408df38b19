"""The CLI's warm pools without VMs: the claim/release requests on the control socket, pool
names, one pool process per name, and a claim's refusals (tests/integration/test_pool.py
runs them for real)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from matchlock.errors import MatchlockError
from matchlock.sandbox import pool, request, wire


def test_pool_requests_are_parsed_strictly() -> None:
    ok = request.parse_request({"op": "pool-claim", "pool": "web abc", "argv": ["sleep", "1"]})
    assert ok == request.PoolRequest("claim", "web abc", ["sleep", "1"])
    assert request.parse_request({"op": "pool-release", "pool": "web abc", "argv": []}) == \
        request.PoolRequest("release", "web abc", [])
    for bad in ({"op": "pool-claim", "pool": "web abc"},
                {"op": "pool-claim", "pool": "", "argv": []},
                {"op": "pool-claim", "pool": "x" * 201, "argv": []},
                {"op": "pool-claim", "pool": 1, "argv": []},
                {"op": "pool-claim", "pool": "p t", "argv": ["a\0b"]},
                {"op": "pool-claim", "pool": "p t", "argv": [], "env": []},
                {"op": "pool-steal", "pool": "p t", "argv": []}):
        with pytest.raises(wire.WireError):
            request.parse_request(bad)


def test_names() -> None:
    assert pool.check_name("web-1.a_b") == "web-1.a_b"
    for bad in ("", "-x", "a/b", "..", "a b", "x" * 64):
        with pytest.raises(MatchlockError, match="invalid pool name"):
            pool.check_name(bad)


def test_one_pool_process_per_name_and_its_token() -> None:
    with pytest.raises(MatchlockError, match="not running"):
        pool.live_tag("nopool")
    lock = pool.PoolLock("unit")
    try:
        assert pool.live_tag("unit") == lock.member_tag
        assert lock.member_tag.startswith("unit ") and len(lock.member_tag) == 5 + 32
        # another process cannot start the same pool (flock per open file description)
        r = subprocess.run([sys.executable, "-c",
                            "from matchlock.sandbox import pool; pool.PoolLock('unit')"],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "pool unit is already running" in r.stderr
    finally:
        lock.release()
    with pytest.raises(MatchlockError, match="not running"):
        pool.live_tag("unit")
    again = pool.PoolLock("unit")
    assert again.member_tag != lock.member_tag  # a new pool, a new token
    again.release()


@pytest.mark.parametrize("args, message", [
    (["run", "--pool", "p"], "--pool needs -d"),
    (["run", "-d", "--pool", "p", "--memory", "1g"], "drop --memory"),
    (["run", "-d", "--pool", "p", "-e", "A=1", "--", "true"], "drop --env"),
    (["run", "-d", "--pool", "p", "--", "true"], "pool p is not running"),
    (["pool", "p", "--", "-d"], "cannot take -d"),
    (["pool", "p", "--", "--publish=8080:80"], "cannot take --publish=8080:80"),
    (["pool", "p", "--", "--memory", "256", "--", "sh"], "run no command"),
    (["pool", "a/b"], "invalid pool name"),
])
def test_cli_refusals(args: list[str], message: str) -> None:
    r = subprocess.run([sys.executable, "-m", "matchlock.cli.main", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
