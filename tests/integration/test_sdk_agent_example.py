"""examples/agent_loop.py end to end: the agent loop in a real VM calls a scripted model API
(HTTPS, a test CA) in a network namespace these tests create, through a secret.

The model's host `api.test` resolves, for the sandbox only, to the namespace's address (the
example's MODEL_API_ADDR pin); `matchlock rpc` trusts the test CA through
MATCHLOCK_UPSTREAM_CA. Run under `flock /tmp/ml-netns.lock` (fixed test addresses).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .rpc_util import wait_no_leftovers
from .test_network import UPSTREAM, _ca, namespace_server
from .test_sdk_examples import example

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]
Run = Callable[..., subprocess.CompletedProcess[bytes]]
NS = f"mltest-up-{os.getpid()}"
VETH = f"mlt{os.getpid() % 100000}"
KEY = "sk-ant-test-" + secrets.token_hex(12)


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="module")
def model_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The scripted model server on https://api.test (10.99.0.2:443) in its own namespace;
    the directory with its CA (ca.pem) and request log."""
    d = tmp_path_factory.mktemp("model-api")
    _ca(d)
    (d / "key").write_text(KEY)
    with namespace_server("model_server.py", d, UPSTREAM):
        yield d


def _requests(d: Path) -> list[dict[str, object]]:
    path = d / "requests.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_agent_loop_through_a_secret(model_api: Path, python_image: str, tmp_path: Path,
                                     ml: Run, state_dir: Path) -> None:
    env = {"ANTHROPIC_API_KEY": KEY, "MODEL_API_URL": "https://api.test/v1/messages",
           "MODEL_API_ADDR": UPSTREAM, "MATCHLOCK_UPSTREAM_CA": str(model_api / "ca.pem"),
           "MODEL": "test-model"}
    r = example("agent_loop.py", "What is six times seven?", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout.splitlines()
    # The model's three tool calls ran in the guest, in order, and it answered from them.
    assert out[0] == "Step 1." and out[1] == "$ echo key=$ANTHROPIC_API_KEY"
    placeholder = out[2].removeprefix("key=")
    assert placeholder.startswith("SANDBOX_SECRET_") and KEY not in placeholder
    assert out[3:6] == ["Step 2.", "$ python3 -c 'print(6 * 7)' > answer.txt && cat answer.txt",
                        "42"]
    # No other host is reachable: not even its name resolves.
    assert out[6:10] == ["Step 3.", "$ wget -q -T 5 -O- https://other.test/ 2>&1 || echo blocked",
                         "wget: bad address 'other.test'", "blocked"]
    assert out[-1] == "The answer is 42."
    assert KEY not in r.stdout + r.stderr
    # Upstream: four calls, each with the real key (the proxy put it in), never the
    # placeholder; the guest's view of the key reached the model only as the placeholder.
    reqs = _requests(model_api)
    assert [q["api_key"] for q in reqs] == [KEY] * 4
    assert all(q["path"] == "/v1/messages" for q in reqs)
    body = json.dumps(reqs[-1]["body"])
    assert f"key={placeholder}" in body and KEY not in body
    assert wait_no_leftovers(state_dir) == []
