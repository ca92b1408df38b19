"""Method parameters (rpc/config.py): what SDK 0.2.17 sends is accepted; what this server
cannot honour is refused with -32602 naming the field; mapping helpers of the session."""

from __future__ import annotations

from typing import Any

import pytest

from matchlock.guest.protocol import DirEntry
from matchlock.image.config import ImageConfig
from matchlock.net.audit import AuditEvent
from matchlock.rpc import config as c
from matchlock.rpc.methods import network_event
from matchlock.rpc.protocol import INVALID_PARAMS, RpcError
from matchlock.rpc.session import file_info, go_file_mode, merge_image_config


def _err(params: Any) -> str:
    with pytest.raises(RpcError) as e:
        c.parse_create(params)
    assert e.value.code == INVALID_PARAMS
    return e.value.message


def test_sdk_launch_params() -> None:
    # Client.launch(Sandbox(...).allow_host(...).add_secret_with_placeholder(...)
    #   .add_host(...).with_env(...).with_user(...).with_workspace(...).mount_host_dir(...))
    spec = c.parse_create({
        "image": "python:3.12-alpine",
        "resources": {"cpus": 0.5, "memory_mb": 256},
        "network": {"allowed_hosts": ["api.example.com"], "block_private_ips": True,
                    "add_hosts": [{"host": "db.internal", "ip": "10.0.0.10"}],
                    "secrets": {"TOK": {"value": "sk-very-secret", "hosts": ["api.example.com"],
                                        "placeholder": "SANDBOX_SECRET_MINE_0123456789"}},
                    "hostname": "box"},
        "vfs": {"mounts": {"/workspace": {"type": "host_fs", "host_path": "/srv/x",
                                          "readonly": True},
                           "/workspace/tmp": {"type": "memory"}},
                "workspace": "/workspace"},
        "env": {"A": "1"},
        "image_config": {"user": "nobody", "entrypoint": ["sleep"], "cmd": ["9"]},
        "launch_entrypoint": True,
        "something_new": {"ignored": True},
    })
    assert spec.image == "python:3.12-alpine"
    assert (spec.cpus, spec.memory_mb, spec.disk_size_mb) == (0.5, 256, 5120)
    assert spec.network.allowed_hosts == ("api.example.com",)
    assert spec.network.add_hosts == ("db.internal:10.0.0.10",)
    assert spec.network.block_private_ips and spec.network.hostname == "box"
    (secret,) = spec.network.secrets
    assert (secret.name, secret.hosts, secret.placeholder) == (
        "TOK", ("api.example.com",), "SANDBOX_SECRET_MINE_0123456789")
    assert "sk-very-secret" not in repr(secret)
    assert spec.workspace == "/workspace"
    assert spec.mounts == (
        c.MountConfig("/workspace", "host_fs", "/srv/x", True),
        c.MountConfig("/workspace/tmp", "memory"),
    )
    assert spec.env == {"A": "1"} and spec.launch_entrypoint
    assert spec.image_config == c.ImageOverrides(user="nobody", entrypoint=("sleep",),
                                                 cmd=("9",))


def test_defaults() -> None:
    spec = c.parse_create({"image": "alpine"})
    assert spec == c.CreateSpec(image="alpine")
    assert spec.network.block_private_ips and not spec.network.no_network


@pytest.mark.parametrize(("params", "message"), [
    (None, "image is required (e.g., alpine:latest)"),
    ({"image": ""}, "image is required (e.g., alpine:latest)"),
    ({"image": "a", "id": "vm-1"}, "id is internal-only and cannot be set"),
    ({"image": "a", "network": {"no_network": True, "allowed_hosts": ["a.com"]}},
     "invalid configuration: network.no_network cannot be combined with "
     "network.allowed_hosts"),
    ({"image": "a", "network": {"no_network": True, "secrets": {"K": {"value": "v"}}}},
     "invalid configuration: network.no_network cannot be combined with network.secrets"),
    ({"image": "a", "network": {"no_network": True, "intercept": True}},
     "invalid configuration: network.no_network cannot be combined with network.intercept"),
    ({"image": "a", "vfs": {"workspace": "/workspace"}},
     "invalid configuration: vfs.workspace requires at least one entry in vfs.mounts"),
    ({"image": "a", "vfs": {"mounts": {"/w": {"type": "memory"}}}},
     "invalid configuration: vfs.mounts requires vfs.workspace"),
    ({"image": "a", "vfs": {"workspace": "/w", "mounts": {"/x": {"type": "memory"}}}},
     "invalid configuration: vfs mount path '/x' is not within the workspace /w"),
    ({"image": "a", "resources": {"cpus": "2"}},
     "invalid params: resources.cpus must be a non-negative number"),
    ({"image": "a", "network": {"allowed_hosts": "a.com"}},
     "invalid params: network.allowed_hosts must be a list of strings"),
    ({"image": "a", "env": {"A B": "1"}}, "invalid params: env: invalid variable name 'A B'"),
    ({"image": "a", "network": {"dns_servers": ["dns.google"]}},
     "invalid configuration: network.dns_servers: 'dns.google' is not an IP address"),
])
def test_create_errors(params: Any, message: str) -> None:
    assert _err(params) == message


@pytest.mark.parametrize(("params", "field"), [
    ({"vfs": {"workspace": "/w", "mounts": {"/w": {"type": "memory"}},
              "interception": {"emit_events": True}}}, "vfs.interception"),
    ({"vfs": {"interception": {"rules": [{"action": "block"}]}}}, "vfs.interception"),
    ({"kernel": {"ref": "file:///k"}}, "kernel.ref"),
    ({"network": {"mtu": 9000}}, "network.mtu"),
    ({"network": {"policy_script": "x"}}, "network.policy_script"),
    ({"vfs": {"workspace": "/w", "mounts": {"/w": {"type": "host_fs", "host_path": "/h",
                                                   "owner_uid": 0}}}},
     "vfs.mounts[/w].owner_uid"),
])
def test_unsupported_fields_are_named(params: dict[str, Any], field: str) -> None:
    message = _err({"image": "a", **params})
    assert message.startswith(f"{field} is not supported")


def test_extra_disks() -> None:
    spec = c.parse_create({"image": "a", "extra_disks": [
        {"host_path": "/v/data.ext4", "guest_mount": "/data"},
        {"host_path": "@cache", "guest_mount": "/cache", "readonly": True}]})
    assert spec.extra_disks == (c.DiskConfig("/v/data.ext4", "/data"),
                                c.DiskConfig("@cache", "/cache", True))
    assert _err({"image": "a", "extra_disks": [{"host_path": "/x"}]}) == (
        "invalid configuration: extra_disks entries need a host_path and a guest_mount")
    assert _err({"image": "a", "extra_disks": {"host_path": "/x"}}) == (
        "invalid params: extra_disks must be a list")


def test_empty_optional_blocks_are_fine() -> None:
    # What the SDK sends for options it did not set.
    spec = c.parse_create({"image": "a", "kernel": {}, "extra_disks": [],
                           "network": {"allowed_hosts": [], "block_private_ips": False,
                                       "mtu": 1500},
                           "image_config": {}})
    assert not spec.network.block_private_ips and spec.network.allowed_hosts == ()


def test_exec_params() -> None:
    assert c.parse_exec({"command": "ls", "working_dir": "/tmp", "user": "1000"}) == (
        c.ExecSpec("ls", "/tmp", "1000"))
    assert c.parse_exec({"command": "sh", "rows": 30, "cols": 100}, tty=True) == (
        c.ExecSpec("sh", rows=30, cols=100))
    assert c.parse_exec({"command": "sh"}, tty=True) == c.ExecSpec("sh", rows=24, cols=80)
    for bad in ({"command": 1}, {"command": "x", "working_dir": "rel"}, [1]):
        with pytest.raises(RpcError):
            c.parse_exec(bad)
    with pytest.raises(RpcError):
        c.parse_exec({"command": "x", "rows": 70000}, tty=True)


def test_file_params() -> None:
    w = c.parse_write({"path": "/a", "content": "aGk=", "mode": 0o600})
    assert (w.path, w.content, w.mode) == ("/a", b"hi", 0o600)
    assert c.parse_write({"path": "/a", "content": ""}).mode == 0o644
    with pytest.raises(RpcError, match="invalid base64 in content"):
        c.parse_write({"path": "/a", "content": "a!=="})
    with pytest.raises(RpcError, match="path is required"):
        c.parse_path({})
    assert c.parse_target({"id": 4, "data": "eA=="}) == 4
    assert c.parse_data({"id": 4, "data": "eA=="}) == b"x"
    assert c.parse_resize({"id": 4, "rows": 40, "cols": 120}) == (40, 120)
    with pytest.raises(RpcError):
        c.parse_target({"id": "4"})
    assert c.parse_close_timeout({"timeout_seconds": 2.0}) == 2.0
    assert c.parse_close_timeout(None) == 0.0


def test_image_config_merge() -> None:
    image = ImageConfig(entrypoint=("python",), cmd=("app.py",), env=("PATH=/bin", "A=1"),
                        working_dir="/app", user="app")
    spec = c.parse_create({"image": "x", "image_config": {"cmd": [], "env": {"B": "2"},
                                                          "working_dir": "/w"}})
    assert merge_image_config(image, spec) == ImageConfig(
        entrypoint=("python",), cmd=(), env=("B=2",), working_dir="/w", user="app")
    assert merge_image_config(image, c.parse_create({"image": "x"})) == image


def test_go_file_modes() -> None:
    assert go_file_mode(0o100644) == 420
    assert go_file_mode(0o040755) == 2147484141  # the reference's 0755 directory
    assert go_file_mode(0o120777) == (1 << 27) | 0o777
    assert go_file_mode(0o104755) == (1 << 23) | 0o755
    assert go_file_mode(0o041777) == (1 << 31) | (1 << 20) | 0o777
    assert file_info(DirEntry("a.txt", 0o100644, 2, 0)) == {
        "name": "a.txt", "size": 2, "mode": 420, "mod_time": "1970-01-01T00:00:00Z",
        "is_dir": False}


def test_network_event_shape() -> None:
    ev = AuditEvent(host="evil.com", port=443, action="block", reason="host not in allowlist",
                    method="GET", path="/get", protocol="https", time=1767225601.5)
    assert network_event(ev) == {"type": "network", "timestamp": 1767225601, "network": {
        "method": "GET", "url": "https://evil.com/get", "host": "evil.com", "status_code": 0,
        "request_bytes": 0, "response_bytes": 0, "duration_ms": 0, "blocked": True,
        "block_reason": "host not in allowlist", "port": 443, "protocol": "https"}}
    ok = AuditEvent(host="h.com", port=80, action="allow", reason="", method="GET", path="/",
                    status=200, bytes_down=5, protocol="http", duration_ms=3.7)
    net = network_event(ok)["network"]
    assert net["url"] == "http://h.com/" and "block_reason" not in net
    assert net["duration_ms"] == 3 and not net["blocked"]


def test_network_interception_is_compiled() -> None:
    spec = c.parse_create({"image": "a", "network": {
        "allowed_hosts": ["a.test"], "intercept": True,
        "interception": {"callback_socket": "/tmp/x/hook.sock", "rules": [
            {"name": "tag", "phase": "before", "hosts": ["a.test"],
             "set_headers": {"x-tag": "1"}},
            {"name": "cb", "phase": "after", "action": "allow", "callback_id": "network_hook_2",
             "timeout_ms": 500},
            {"name": "noop", "action": "allow"}]}}})
    hooks = spec.network.hooks
    assert hooks is not None and hooks.callback_socket == "/tmp/x/hook.sock"
    assert [(r.name, r.phase, r.action) for r in hooks.rules] == [
        ("tag", "before", "mutate"), ("cb", "after", "allow")]
    assert hooks.rules[0].set_headers == (("X-Tag", "1"),)
    assert hooks.rules[1].timeout_ms == 500
    # Rules that can do nothing leave no hooks at all.
    spec = c.parse_create({"image": "a", "network": {"interception": {"rules": [{}]}}})
    assert spec.network.hooks is None


@pytest.mark.parametrize(("rules", "socket", "message"), [
    ([{"name": "r", "callback_id": "network_hook_1"}], "",
     "rule 'r' has callback_id 'network_hook_1' but no network.interception.callback_socket"),
    ([{"action": "blok"}], "", "action 'blok' must be 'allow', 'block' or 'mutate'"),
    ([{"phase": "during", "action": "block"}], "", "phase 'during' must be"),
    ([{"set_headers": {"Host": "evil.test"}}], "", "header Host cannot be changed by a hook"),
    ([{"set_headers": {"X-A": "1\r\nX-B: 2"}}], "", "contains CR, LF, NUL"),
    ([{"delete_headers": ["content-length"]}], "", "header Content-Length cannot be changed"),
    ([{"phase": "after", "set_response_headers": {"Transfer-Encoding": "chunked"}}], "",
     "header Transfer-Encoding cannot be changed"),
    ([{"rewrite_path": "v1/x"}], "", "rewrite path 'v1/x' must start with a single '/'"),
    ([{"rewrite_path": "//evil.test/x"}], "", "must start with a single '/'"),
    ([{"hosts": ["10.0.0.1"], "action": "block"}], "", "hosts:"),
    ([{"path": "/a[", "action": "block"}], "", "unclosed '['"),
    ([{"action": "block", "timeout_ms": -1}], "", "timeout_ms must be an integer"),
    ([], "relative.sock", "callback_socket must be an absolute path"),
    ({"action": "block"}, "", "rules must be a list"),
])
def test_network_interception_errors(rules: Any, socket: str, message: str) -> None:
    inter: dict[str, Any] = {"rules": rules}
    if socket:
        inter["callback_socket"] = socket
    got = _err({"image": "a", "network": {"interception": inter}})
    assert got.startswith("invalid configuration: ") and message in got, got
