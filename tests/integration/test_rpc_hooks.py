"""Network hook rules end to end: a real VM driven through `matchlock rpc` by the official SDK
0.2.17 (its own virtualenv) and by this project's SDK, the guest's own wget, and the tests'
upstream server in its namespace (test_network.py). Run under `flock /tmp/ml-netns.lock`."""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from pathlib import Path

import pytest

from .rpc_util import BUILTIN, Rpc, wait_no_leftovers
from .test_network import Upstream, upstream  # noqa: F401 - the module's fixture
from .test_rpc_sdk import sdk, sdk_python  # noqa: F401 - the session's fixture

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]
VALUE = "tok-real-value-0123456789"


@pytest.mark.parametrize("which", ["official", "ours"])
def test_hook_rules_through_the_sdk(sdk_python: Path, tmp_path: Path,  # noqa: F811
                                    upstream: Upstream, state_dir: Path,  # noqa: F811
                                    which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDK has no --upstream-ca: `matchlock rpc` takes it from its environment.
    monkeypatch.setenv("MATCHLOCK_UPSTREAM_CA", str(upstream.ca))
    python = sdk_python if which == "official" else Path(sys.executable)
    marker = f"{which}-{os.getpid()}"
    out = sdk(python, tmp_path, f"""
    from matchlock import NetworkHookRule, NetworkHookResult, NetworkInterceptionConfig
    seen = []
    def gate(req):
        seen.append([req.phase, req.host, req.method, req.path,
                     (req.request_headers or {{}}).get("Authorization")])
        if req.path.startswith("/forbidden"):
            return NetworkHookResult(action="block")
        return None
    sb = (Sandbox("matchlock-builtin:busybox")
          .allow_host("api.test").add_host("api.test", "10.99.0.2")
          .add_secret("TOKEN", "{VALUE}", "api.test")
          .with_network_interception(NetworkInterceptionConfig(rules=[
              NetworkHookRule(name="tag", phase="before", hosts=["api.test"],
                              set_headers={{"X-Hooked": "{marker}"}}),
              NetworkHookRule(name="gate", phase="before", hook=gate, timeout_ms=10000),
          ])))
    with Client() as c:
        c.launch(sb)
        r = c.exec('wget -q -O - --header "Authorization: Bearer $TOKEN" '
                   'https://api.test/tagged-{marker}; echo " rc=$?"')
        out["tagged"] = r.stdout
        r = c.exec('wget -O - http://api.test/forbidden-{marker} 2>&1; echo " rc=$?"')
        out["forbidden"] = r.stdout
        r = c.exec('wget -q -O - http://api.test/plain-{marker}; echo " rc=$?"')
        out["plain"] = r.stdout
    out["seen"] = seen
    c.remove()
    """)
    body, _, rc = out["tagged"].rpartition(" rc=")
    assert rc.strip() == "0", out["tagged"]
    echoed = dict(json.loads(body)["headers"])
    assert echoed["X-Hooked"] == marker  # the origin saw the rule's header
    assert echoed["Authorization"] == "Bearer " + "*" * len(VALUE)  # masked on the way back
    heads = upstream.log("heads.log")
    assert f"X-Hooked: {marker}" in heads and f"Authorization: Bearer {VALUE}" in heads
    # The callback blocked: the guest got a 403 and the origin never saw the request.
    assert "403" in out["forbidden"] and out["forbidden"].strip().endswith("rc=1")
    assert f"/forbidden-{marker}" not in heads
    # Plain HTTP gets the rule too.
    body, _, rc = out["plain"].rpartition(" rc=")
    assert rc.strip() == "0" and dict(json.loads(body)["headers"])["X-Hooked"] == marker
    # The callback saw the placeholder, never the value.
    assert [s[:4] for s in out["seen"]] == [
        ["before", "api.test", "GET", f"/tagged-{marker}"],
        ["before", "api.test", "GET", f"/forbidden-{marker}"],
        ["before", "api.test", "GET", f"/plain-{marker}"]]
    auth = out["seen"][0][4]
    assert auth and auth[0].startswith("Bearer SANDBOX_SECRET_")
    assert VALUE not in json.dumps(out["seen"])
    assert wait_no_leftovers(state_dir) == []


def test_hook_block_is_an_event_and_bad_rules_are_refused(state_dir: Path) -> None:
    """Raw JSON lines: a static block rule answers the guest's request with 403 before any
    dial (no upstream needed) and is an `event` notification; an unsafe rule is -32602."""
    rpc = Rpc()
    rpc.send("create", {"image": BUILTIN, "network": {
        "allowed_hosts": ["allowed.test"],
        "interception": {"rules": [{"set_headers": {"Host": "evil.test"}}]}}}, 1)
    answer, _ = rpc.until(1)
    assert answer["error"]["code"] == -32602
    assert "header Host cannot be changed by a hook" in answer["error"]["message"]
    rpc.create({"network": {"allowed_hosts": ["allowed.test"], "interception": {"rules": [
        {"name": "no-admin", "hosts": ["allowed.test"], "path": "/admin/*",
         "action": "block"}]}}}, rid=2)
    request = "GET //admin/x?tok=1 HTTP/1.1\\r\\nHost: allowed.test\\r\\n\\r\\n"
    rpc.send("exec", {"command": f"printf '{request}' | nc -w 5 allowed.test 80"}, 3)
    answer, before = rpc.until(3)
    stdout = base64.b64decode(answer["result"]["stdout"])
    assert b"403 Forbidden" in stdout and b"network hook no-admin" in stdout
    events = [m["params"] for m in before if m.get("method") == "event"]
    deadline = time.monotonic() + 5
    while not events and time.monotonic() < deadline:
        msg = rpc.next(5)
        if msg.get("method") == "event":
            events.append(msg["params"])
    assert events, "no event notification"
    net = events[0]["network"]
    assert net["blocked"] is True and net["status_code"] == 403
    assert net["host"] == "allowed.test" and "no-admin" in net["block_reason"]
    rpc.finish()
    assert wait_no_leftovers(state_dir) == []
