"""What the SDK sends and how it reads answers, without I/O: `create`'s parameters from
`CreateOptions` (the official SDK's exact shape), port-forward specs, and result objects."""

from __future__ import annotations

import base64
from typing import Any

from matchlock.errors import MatchlockError
from matchlock.sdk.types import (
    NETWORK_HOOK_ACTION_ALLOW,
    CreateOptions,
    ExecResult,
    FileInfo,
    NetworkHookRule,
    PortForward,
    PortForwardBinding,
)


def check_create(opts: CreateOptions) -> None:
    if not opts.image:
        raise MatchlockError("image is required (e.g., alpine:latest)")
    if opts.network_mtu < 0:
        raise MatchlockError("network mtu must be > 0")
    if opts.no_network and (opts.allowed_hosts or opts.secrets or opts.force_interception
                            or opts.network_interception is not None):
        raise MatchlockError("no network cannot be combined with allowed hosts, secrets, "
                             "forced interception, or network interception rules")


def callback_id(index: int) -> str:
    return f"network_hook_{index + 1}"


def network_rules(rules: list[NetworkHookRule]) -> list[dict[str, Any]]:
    """Rules as sent; a rule with a local `hook` gets its callback id (and may not act
    itself)."""
    out = []
    for i, rule in enumerate(rules):
        d = rule.to_dict()
        if rule.hook is not None:
            if (rule.action or "").strip().lower() not in ("", NETWORK_HOOK_ACTION_ALLOW):
                raise MatchlockError(f"invalid network hook {rule.name!r}: callback hooks "
                                     f"cannot set action={rule.action!r}")
            d["callback_id"] = callback_id(i)
        out.append(d)
    return out


def _block_private(opts: CreateOptions) -> tuple[bool, bool]:
    """(value, explicitly set); an explicit True from older callers counts as set."""
    if opts.block_private_ips_set:
        return opts.block_private_ips, True
    return (True, True) if opts.block_private_ips else (False, False)


def network_params(opts: CreateOptions, interception: dict[str, Any] | None
                   ) -> dict[str, Any] | None:
    block, block_set = _block_private(opts)
    if not (opts.allowed_hosts or opts.add_hosts or opts.secrets or opts.dns_servers
            or opts.hostname or opts.network_mtu > 0 or opts.no_network or block_set
            or opts.force_interception or interception is not None):
        return None
    if opts.no_network:
        off: dict[str, Any] = {"no_network": True}
        if opts.dns_servers:
            off["dns_servers"] = opts.dns_servers
        if opts.hostname:
            off["hostname"] = opts.hostname
        return off
    # The server replaces its network defaults wholesale: keep private ranges blocked
    # unless the caller said otherwise.
    net: dict[str, Any] = {"allowed_hosts": opts.allowed_hosts,
                           "block_private_ips": block if block_set else True}
    if opts.add_hosts:
        net["add_hosts"] = [{"host": m.host, "ip": m.ip} for m in opts.add_hosts]
    if opts.force_interception or interception is not None:
        net["intercept"] = True
    if interception is not None:
        net["interception"] = interception
    if opts.secrets:
        secrets: dict[str, Any] = {}
        for s in opts.secrets:
            entry: dict[str, Any] = {"value": s.value, "hosts": s.hosts}
            if s.placeholder:
                entry["placeholder"] = s.placeholder
            secrets[s.name] = entry
        net["secrets"] = secrets
    if opts.dns_servers:
        net["dns_servers"] = opts.dns_servers
    if opts.hostname:
        net["hostname"] = opts.hostname
    if opts.network_mtu > 0:
        net["mtu"] = opts.network_mtu
    return net


def create_params(opts: CreateOptions, callback_socket: str = "") -> dict[str, Any]:
    """`create`'s params. VFS interception is passed through for the server to judge (this
    project's server refuses it by name rather than ignoring it)."""
    check_create(opts)
    interception: dict[str, Any] | None = None
    if opts.network_interception is not None:
        rules = network_rules(opts.network_interception.rules)
        if rules:
            interception = {"rules": rules}
    if callback_socket:
        interception = {**(interception or {}), "callback_socket": callback_socket}
    params: dict[str, Any] = {"image": opts.image}
    if opts.kernel_ref:
        params["kernel"] = {"ref": opts.kernel_ref}
    if opts.privileged:
        params["privileged"] = True
    resources = {k: getattr(opts, k) for k in ("cpus", "memory_mb", "disk_size_mb",
                                               "timeout_seconds") if getattr(opts, k)}
    if resources:
        params["resources"] = resources
    network = network_params(opts, interception)
    if network is not None:
        params["network"] = network
    vfs_wire = opts.vfs_interception.to_dict() if opts.vfs_interception is not None else None
    if vfs_wire is not None and any(r.hook or r.dangerous_hook or r.mutate_hook or r.action_hook
                                    for r in opts.vfs_interception.rules):  # type: ignore[union-attr]
        raise MatchlockError("VFS interception callbacks are not supported by this matchlock")
    if opts.mounts or opts.workspace or vfs_wire:
        vfs: dict[str, Any] = {}
        if opts.mounts:
            vfs["mounts"] = {k: v.to_dict() for k, v in opts.mounts.items()}
        if opts.workspace:
            vfs["workspace"] = opts.workspace
        if vfs_wire:
            vfs["interception"] = vfs_wire
        params["vfs"] = vfs
    if opts.env:
        params["env"] = opts.env
    if opts.image_config is not None:
        params["image_config"] = opts.image_config.to_dict()
    if opts.launch_entrypoint:
        params["launch_entrypoint"] = True
    return params


def _port(raw: str, role: str) -> int:
    value = raw.strip()
    if not value:
        raise MatchlockError(f"invalid port-forward spec: empty {role} port")
    try:
        port = int(value, 10)
    except ValueError:
        raise MatchlockError(f"invalid port value {value!r}") from None
    if not 1 <= port <= 65535:
        raise MatchlockError(f"invalid port value {port}: must be in range 1-65535")
    return port


def parse_port_forward(spec: str) -> PortForward:
    """`[LOCAL:]REMOTE`."""
    value = str(spec).strip()
    if not value:
        raise MatchlockError("invalid port-forward spec: empty spec")
    parts = value.split(":")
    if len(parts) == 1:
        port = _port(parts[0], "remote")
        return PortForward(port, port)
    if len(parts) == 2:
        return PortForward(_port(parts[0], "local"), _port(parts[1], "remote"))
    raise MatchlockError(f"invalid port-forward spec: {value!r} "
                         "(expected [LOCAL_PORT:]REMOTE_PORT)")


def port_forward_params(addresses: list[str] | None, forwards: list[PortForward]
                        ) -> dict[str, Any]:
    return {"forwards": [{"local_port": int(f.local_port), "remote_port": int(f.remote_port)}
                         for f in forwards],
            "addresses": list(addresses) if addresses else ["127.0.0.1"]}


def bindings(result: Any) -> list[PortForwardBinding]:
    if not isinstance(result, dict) or not isinstance(result.get("bindings"), list):
        raise MatchlockError("invalid port_forward response: bindings must be a list")
    out = []
    for b in result["bindings"]:
        if not isinstance(b, dict) or not str(b.get("address", "")).strip():
            raise MatchlockError("invalid port_forward response: binding address is required")
        local, remote = int(b.get("local_port") or 0), int(b.get("remote_port") or 0)
        if not (1 <= local <= 65535 and 1 <= remote <= 65535):
            raise MatchlockError("invalid port_forward response: ports must be in 1-65535")
        out.append(PortForwardBinding(str(b["address"]).strip(), local, remote))
    return out


def b64text(data: Any) -> str:
    return base64.b64decode(str(data or "")).decode("utf-8", errors="replace")


def exec_result(result: Any) -> ExecResult:
    return ExecResult(int(result["exit_code"]), b64text(result.get("stdout")),
                      b64text(result.get("stderr")), int(result.get("duration_ms") or 0))


def file_infos(result: Any) -> list[FileInfo]:
    return [FileInfo(f["name"], int(f["size"]), int(f["mode"]), bool(f["is_dir"]))
            for f in (result or {}).get("files", [])]


def created_id(result: Any) -> str:
    """The sandbox id in a `create` result."""
    if not isinstance(result, dict) or "id" not in result:
        raise MatchlockError("invalid create response: missing id")
    return str(result["id"])
