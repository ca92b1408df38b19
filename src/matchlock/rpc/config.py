"""The parameters of each method, checked: JSON in, typed values out, or an RpcError.

Pure (no I/O). `create` takes the reference's `api.Config` (what SDK 0.2.17 sends, Appendix A
of the spec). Unknown fields are ignored, as the reference's decoder does, except those that
ask for behaviour this server does not have (VFS interception hooks, a custom kernel,
ownership overrides): those are refused with -32602 naming the field, so
that a policy the caller relies on is never silently dropped.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import re
from dataclasses import dataclass, field
from typing import Any

from matchlock.net.hooks import HookConfig, HookError, compile_rules
from matchlock.rpc.protocol import INVALID_PARAMS, RpcError

MOUNT_TYPES = ("memory", "host_fs", "overlay")
_WORKSPACE = re.compile(r"^/[a-zA-Z0-9/_.-]+$")
MAX_TTY = 65535


def _bad(message: str) -> RpcError:
    return RpcError(INVALID_PARAMS, message)


def _invalid(message: str) -> RpcError:
    return RpcError(INVALID_PARAMS, f"invalid configuration: {message}")


def _obj(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"invalid params: {where} must be an object")
    return value


def _objs(value: Any, where: str) -> list[dict[str, Any]]:
    """A list of objects (absent or null: none)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad(f"invalid params: {where} must be a list")
    return [_obj(entry, f"{where}[]") for entry in value]


def _str(d: dict[str, Any], key: str, where: str) -> str:
    v = d.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise _bad(f"invalid params: {where}{key} must be a string")
    if "\0" in v:
        raise _bad(f"invalid params: {where}{key} contains a NUL character")
    return v


def _bool(d: dict[str, Any], key: str, where: str) -> bool:
    v = d.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _bad(f"invalid params: {where}{key} must be a boolean")
    return v


def _int(d: dict[str, Any], key: str, where: str, lo: int = 0, hi: int = (1 << 32) - 1) -> int:
    v = d.get(key)
    if v is None:
        return 0
    if type(v) is not int or not lo <= v <= hi:
        raise _bad(f"invalid params: {where}{key} must be an integer in {lo}..{hi}")
    return v


def _number(d: dict[str, Any], key: str, where: str) -> float:
    v = d.get(key)
    if v is None:
        return 0.0
    if type(v) not in (int, float) or not math.isfinite(v) or v < 0:
        raise _bad(f"invalid params: {where}{key} must be a non-negative number")
    return float(v)


def _strings(d: dict[str, Any], key: str, where: str) -> list[str] | None:
    """A list of strings; None when absent or null (the reference tells null from [])."""
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(s, str) and "\0" not in s for s in v):
        raise _bad(f"invalid params: {where}{key} must be a list of strings")
    return list(v)


def _string_map(d: dict[str, Any], key: str, where: str) -> dict[str, str] | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
        raise _bad(f"invalid params: {where}{key} must be an object of strings")
    for name, value in v.items():
        if not name or "=" in name or "\0" in name or "\0" in value or any(
                c.isspace() for c in name):
            raise _bad(f"invalid params: {where}{key}: invalid variable name {name!r}")
    return dict(v)


def _unsupported(where: str, why: str) -> RpcError:
    return _bad(f"{where} is not supported by this server ({why})")


# --- create ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecretSpec:
    name: str
    value: str
    hosts: tuple[str, ...]
    placeholder: str = ""

    def __repr__(self) -> str:
        return f"SecretSpec(name={self.name!r}, hosts={self.hosts!r}, value=<hidden>)"


@dataclass(frozen=True)
class NetworkSpec:
    allowed_hosts: tuple[str, ...] = ()
    add_hosts: tuple[str, ...] = ()  # HOST:IP, as --add-host
    block_private_ips: bool = True
    no_network: bool = False
    secrets: tuple[SecretSpec, ...] = ()
    dns_servers: tuple[str, ...] = ()
    hostname: str = ""
    hooks: HookConfig | None = None  # network.interception, compiled (net/hooks.py)


@dataclass(frozen=True)
class MountConfig:
    guest: str
    type: str  # memory | host_fs | overlay
    host_path: str = ""
    readonly: bool = False


@dataclass(frozen=True)
class DiskConfig:
    host_path: str  # an ext4 image file (`matchlock volume create` prints its path), or @NAME
    guest_mount: str
    readonly: bool = False


@dataclass(frozen=True)
class ImageOverrides:
    user: str = ""
    working_dir: str = ""
    entrypoint: tuple[str, ...] | None = None  # None: keep the image's
    cmd: tuple[str, ...] | None = None
    env: dict[str, str] | None = None  # replaces the image's Env wholesale


@dataclass(frozen=True)
class CreateSpec:
    image: str
    privileged: bool = False
    launch_entrypoint: bool = False
    cpus: float = 1.0
    memory_mb: int = 512
    disk_size_mb: int = 5120
    timeout_seconds: float = 0.0
    network: NetworkSpec = field(default_factory=NetworkSpec)
    workspace: str = ""
    mounts: tuple[MountConfig, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    image_config: ImageOverrides = field(default_factory=ImageOverrides)
    extra_disks: tuple[DiskConfig, ...] = ()


def _present(value: Any) -> bool:
    """Set to something: not absent, null, false, 0, "" or empty."""
    return value not in (None, False, 0, "", [], {})


def parse_create(params: Any) -> CreateSpec:
    p = _obj(params, "params")
    image = _str(p, "image", "")
    if not image:
        raise _bad("image is required (e.g., alpine:latest)")
    if _str(p, "id", ""):
        raise _bad("id is internal-only and cannot be set")
    kernel = p.get("kernel")
    if _present(kernel) and _present(_obj(kernel, "kernel").get("ref")):
        raise _unsupported("kernel.ref", "sandboxes boot matchlock's own kernel")
    disks = _parse_disks(p.get("extra_disks"))
    res = _obj(p.get("resources"), "resources")
    cpus = _number(res, "cpus", "resources.") or 1.0
    memory = _int(res, "memory_mb", "resources.") or 512
    disk = _int(res, "disk_size_mb", "resources.") or 5120
    timeout = _number(res, "timeout_seconds", "resources.")
    network = _parse_network(p.get("network"))
    workspace, mounts = _parse_vfs(p.get("vfs"))
    env = _string_map(p, "env", "") or {}
    overrides = _parse_image_config(p.get("image_config"))
    return CreateSpec(
        image=image, privileged=_bool(p, "privileged", ""),
        launch_entrypoint=_bool(p, "launch_entrypoint", ""), cpus=cpus, memory_mb=memory,
        disk_size_mb=disk, timeout_seconds=timeout, network=network, workspace=workspace,
        mounts=mounts, env=env, image_config=overrides, extra_disks=disks,
    )


def _parse_disks(value: Any) -> tuple[DiskConfig, ...]:
    out = []
    for d in _objs(value, "extra_disks"):
        where = "extra_disks[]."
        host, guest = _str(d, "host_path", where), _str(d, "guest_mount", where)
        if not host or not guest:
            raise _invalid("extra_disks entries need a host_path and a guest_mount")
        out.append(DiskConfig(host_path=host, guest_mount=guest,
                              readonly=_bool(d, "readonly", where)))
    return tuple(out)


def _parse_network(value: Any) -> NetworkSpec:
    if value is None:
        return NetworkSpec()
    n = _obj(value, "network")
    w = "network."
    no_network = _bool(n, "no_network", w)
    allowed = _strings(n, "allowed_hosts", w) or []
    secrets = _parse_secrets(n.get("secrets"))
    intercept = _bool(n, "intercept", w)
    interception = n.get("interception")
    if no_network:
        for key, present in (("allowed_hosts", bool(allowed)), ("secrets", bool(secrets)),
                             ("intercept", intercept),
                             ("interception", interception is not None)):
            if present:
                raise _invalid(f"network.no_network cannot be combined with network.{key}")
    hooks = _parse_interception(interception)
    if _str(n, "policy_script", w):
        raise _unsupported("network.policy_script", "policies are allow-lists")
    mtu = _int(n, "mtu", w)
    if mtu not in (0, 1500):
        raise _unsupported("network.mtu", "the guest NIC's MTU is 1500")
    add_hosts = []
    for e in _objs(n.get("add_hosts"), "network.add_hosts"):
        where = "network.add_hosts[]."
        host, ip = _str(e, "host", where), _str(e, "ip", where)
        if not host or not ip:
            raise _invalid("network.add_hosts entries need a host and an ip")
        add_hosts.append(f"{host}:{ip}")
    if no_network and add_hosts:
        raise _invalid("network.no_network cannot be combined with network.add_hosts")
    block = n.get("block_private_ips")
    if block is not None and not isinstance(block, bool):
        raise _bad("invalid params: network.block_private_ips must be a boolean")
    dns = _strings(n, "dns_servers", w) or []
    for server in dns:
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise _invalid(f"network.dns_servers: {server!r} is not an IP address") from None
    return NetworkSpec(
        allowed_hosts=tuple(allowed), add_hosts=tuple(add_hosts),
        # Absent means blocked: a network block that forgets it must not open private ranges.
        block_private_ips=block is not False, no_network=no_network, secrets=secrets,
        dns_servers=tuple(dns),
        hostname=_str(n, "hostname", w), hooks=hooks,
    )


def _parse_interception(value: Any) -> HookConfig | None:
    """`network.interception`: rules checked and compiled now, so that a rule that cannot be
    applied safely is a -32602 at `create`, never a surprise per request."""
    if value is None:
        return None
    inter = _obj(value, "network.interception")
    socket_path = _str(inter, "callback_socket", "network.interception.")
    try:
        config = compile_rules(inter.get("rules"), socket_path)
    except HookError as e:
        raise _invalid(str(e)) from None
    return config if config.active else None


def _parse_secrets(value: Any) -> tuple[SecretSpec, ...]:
    if value is None:
        return ()
    out = []
    for name, raw in _obj(value, "network.secrets").items():
        s = _obj(raw, f"network.secrets.{name}")
        where = f"network.secrets.{name}."
        hosts = _strings(s, "hosts", where) or []
        out.append(SecretSpec(name=name, value=_str(s, "value", where), hosts=tuple(hosts),
                              placeholder=_str(s, "placeholder", where)))
    return tuple(out)


def _parse_vfs(value: Any) -> tuple[str, tuple[MountConfig, ...]]:
    if value is None:
        return "", ()
    v = _obj(value, "vfs")
    if v.get("interception") is not None:
        raise _unsupported("vfs.interception", "VFS hooks and file events")
    if _present(v.get("direct_mounts")):
        raise _unsupported("vfs.direct_mounts", "use vfs.mounts")
    workspace = _str(v, "workspace", "vfs.")
    raw = _obj(v.get("mounts"), "vfs.mounts")
    if workspace and not raw:
        raise _invalid("vfs.workspace requires at least one entry in vfs.mounts")
    if raw and not workspace:
        raise _invalid("vfs.mounts requires vfs.workspace")
    if workspace and not _WORKSPACE.match(workspace):
        raise _invalid(f"vfs.workspace {workspace!r} must be an absolute path of letters, "
                       "digits and / _ . -")
    mounts = []
    for guest, cfg in raw.items():
        m = _obj(cfg, f"vfs.mounts[{guest}]")
        where = f"vfs.mounts[{guest}]."
        if guest != workspace and not guest.startswith(workspace.rstrip("/") + "/"):
            raise _invalid(f"vfs mount path {guest!r} is not within the workspace {workspace}")
        kind = _str(m, "type", where) or "memory"
        if kind not in MOUNT_TYPES:
            raise _invalid(f"{where}type {kind!r} must be one of {', '.join(MOUNT_TYPES)}")
        for key in ("owner_uid", "owner_gid"):
            if m.get(key) is not None:
                raise _unsupported(where + key, "guest files keep their owners")
        for key in ("upper", "lower"):
            if m.get(key) is not None:
                raise _unsupported(where + key, "overlay layers are managed by the server")
        host = _str(m, "host_path", where)
        readonly = _bool(m, "readonly", where)
        if kind in ("host_fs", "overlay") and not host:
            raise _invalid(f"{where}host_path is required for a {kind} mount")
        if kind in ("host_fs", "overlay") and not host.startswith("/"):
            raise _invalid(f"{where}host_path {host!r} must be absolute")
        if kind == "memory" and host:
            raise _invalid(f"{where}host_path is not used by a memory mount")
        mounts.append(MountConfig(guest=guest, type=kind, host_path=host, readonly=readonly))
    return workspace, tuple(mounts)


def _parse_image_config(value: Any) -> ImageOverrides:
    if value is None:
        return ImageOverrides()
    c = _obj(value, "image_config")
    w = "image_config."
    ep = _strings(c, "entrypoint", w)
    cmd = _strings(c, "cmd", w)
    return ImageOverrides(
        user=_str(c, "user", w), working_dir=_str(c, "working_dir", w),
        entrypoint=None if ep is None else tuple(ep), cmd=None if cmd is None else tuple(cmd),
        env=_string_map(c, "env", w),
    )


# --- exec and files ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ExecSpec:
    command: str
    working_dir: str = ""
    user: str = ""
    rows: int = 24
    cols: int = 80


def parse_exec(params: Any, tty: bool = False) -> ExecSpec:
    p = _obj(params, "params")
    command = _str(p, "command", "")
    working_dir = _str(p, "working_dir", "")
    if working_dir and not working_dir.startswith("/"):
        raise _bad(f"working_dir {working_dir!r} must be an absolute path")
    rows = cols = 0
    if tty:
        rows = _int(p, "rows", "", 0, MAX_TTY) or 24
        cols = _int(p, "cols", "", 0, MAX_TTY) or 80
    return ExecSpec(command=command, working_dir=working_dir, user=_str(p, "user", ""),
                    rows=rows or 24, cols=cols or 80)


def parse_target(params: Any) -> int:
    """`params.id` of stdin, stdin_eof, resize and cancel: the request they are about."""
    p = _obj(params, "params")
    target = p.get("id")
    if type(target) is not int or target < 0:
        raise _bad("invalid params: id must be a request id")
    return target


def parse_data(params: Any) -> bytes:
    p = _obj(params, "params")
    return decode_b64(_str(p, "data", ""), "data")


def parse_resize(params: Any) -> tuple[int, int]:
    p = _obj(params, "params")
    rows = _int(p, "rows", "", 1, MAX_TTY)
    cols = _int(p, "cols", "", 1, MAX_TTY)
    if not rows or not cols:
        raise _bad("invalid params: rows and cols are required")
    return rows, cols


def decode_b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"invalid base64 in {what}") from None


def parse_path(params: Any) -> str:
    p = _obj(params, "params")
    path = _str(p, "path", "")
    if not path:
        raise _bad("path is required")
    return path


def parse_limit(params: Any) -> int | None:
    """read_file_stream's optional `limit` (bytes, ≥ 0)."""
    p = _obj(params, "params")
    if p.get("limit") is None:
        return None
    return _int(p, "limit", "", 0, 1 << 62)


def parse_via(params: Any) -> bool:
    """The streamed file methods' `via`: "fd" = content on the data channel; absent or
    "json" = base64 in JSON lines."""
    v = _obj(params, "params").get("via")
    if v in (None, "", "json"):
        return False
    if v == "fd":
        return True
    raise _bad('invalid params: via must be "fd" or "json"')


def parse_mode(params: Any) -> int:
    """A file's permission bits; absent or 0 → 0644 (as write_file)."""
    return _int(_obj(params, "params"), "mode", "", 0, 0o7777) or 0o644


@dataclass(frozen=True)
class WriteSpec:
    path: str
    content: bytes
    mode: int


def parse_write(params: Any) -> WriteSpec:
    p = _obj(params, "params")
    path = parse_path(p)
    content = decode_b64(_str(p, "content", ""), "content")
    return WriteSpec(path=path, content=content, mode=parse_mode(p))


def parse_close_timeout(params: Any) -> float:
    p = _obj(params, "params")
    return _number(p, "timeout_seconds", "")


def parse_hosts(params: Any) -> list[str]:
    """`allow_list_add/delete`: `hosts`, trimmed, de-duplicated, empties dropped (as the
    reference); the patterns themselves are checked by the policy's parser."""
    p = _obj(params, "params")
    raw = p.get("hosts")
    if not isinstance(raw, list) or not all(isinstance(h, str) for h in raw):
        raise _bad("hosts is required")
    hosts = list(dict.fromkeys(h.strip() for h in raw if h.strip()))
    if not hosts:
        raise _bad("hosts is required")
    return hosts


@dataclass(frozen=True)
class ForwardSpec:
    forwards: tuple[tuple[int, int], ...]  # (local, remote); local 0 = any free port
    addresses: tuple[str, ...]


def parse_port_forward(params: Any) -> ForwardSpec:
    p = _obj(params, "params")
    raw = p.get("forwards")
    if not isinstance(raw, list) or not raw:
        raise _bad("forwards is required")
    forwards = []
    for i, f in enumerate(raw):
        f = _obj(f, f"forwards[{i}]")
        local = _int(f, "local_port", f"forwards[{i}].", 0, 65535)
        remote = _int(f, "remote_port", f"forwards[{i}].", 0, 65535)
        if not remote:
            raise _bad(f"invalid params: forwards[{i}].remote_port must be 1-65535")
        forwards.append((local, remote))
    addresses = _strings(p, "addresses", "") or ["127.0.0.1"]
    for a in addresses:
        try:
            ipaddress.ip_address("127.0.0.1" if a == "localhost" else a)
        except ValueError:
            raise _bad(f"invalid params: address {a!r} is not an IP address") from None
    return ForwardSpec(tuple(forwards), tuple(addresses))
