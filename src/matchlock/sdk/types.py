"""The SDK's data types: the same names, fields, defaults and wire shapes (`to_dict`) as the
official matchlock SDK, so programs written against it run unchanged."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from matchlock.errors import MatchlockError
from matchlock.rpc import protocol as _codes

VFS_HOOK_PHASE_BEFORE = "before"
VFS_HOOK_PHASE_AFTER = "after"
VFS_HOOK_ACTION_ALLOW = "allow"
VFS_HOOK_ACTION_BLOCK = "block"
NETWORK_HOOK_PHASE_BEFORE = "before"
NETWORK_HOOK_PHASE_AFTER = "after"
NETWORK_HOOK_ACTION_ALLOW = "allow"
NETWORK_HOOK_ACTION_BLOCK = "block"
NETWORK_HOOK_ACTION_MUTATE = "mutate"

VFS_HOOK_OP_STAT = "stat"
VFS_HOOK_OP_READDIR = "readdir"
VFS_HOOK_OP_OPEN = "open"
VFS_HOOK_OP_CREATE = "create"
VFS_HOOK_OP_MKDIR = "mkdir"
VFS_HOOK_OP_CHMOD = "chmod"
VFS_HOOK_OP_REMOVE = "remove"
VFS_HOOK_OP_REMOVE_ALL = "remove_all"
VFS_HOOK_OP_RENAME = "rename"
VFS_HOOK_OP_SYMLINK = "symlink"
VFS_HOOK_OP_READLINK = "readlink"
VFS_HOOK_OP_READ = "read"
VFS_HOOK_OP_WRITE = "write"
VFS_HOOK_OP_CLOSE = "close"
VFS_HOOK_OP_SYNC = "sync"
VFS_HOOK_OP_TRUNCATE = "truncate"

VFSHookPhase: TypeAlias = Literal["", "before", "after"]
VFSHookOp: TypeAlias = Literal["stat", "readdir", "open", "create", "mkdir", "chmod", "remove",
                               "remove_all", "rename", "symlink", "readlink", "read", "write",
                               "close", "sync", "truncate"]
VFSHookAction: TypeAlias = Literal["allow", "block"]
NetworkHookPhase: TypeAlias = Literal["", "before", "after"]
NetworkHookAction: TypeAlias = Literal["allow", "block", "mutate"]


def _put(d: dict[str, Any], key: str, value: Any) -> None:
    """Wire dicts carry only fields that are set (empty, zero and false are left out)."""
    if value:
        d[key] = value


@dataclass
class Config:
    """How the client starts `matchlock rpc`."""

    binary_path: str = "matchlock"
    use_sudo: bool = False


def _check_id(value: int | None, name: str) -> None:
    if value is not None and not 0 <= value <= 0xFFFF_FFFF:
        raise ValueError(f"{name} must be in [0, 4294967295], got {value}")


@dataclass
class MountConfig:
    """A folder in the guest: `memory`, `host_fs` (with host_path; readonly) or `overlay`."""

    type: str = "memory"
    host_path: str = ""
    readonly: bool = False
    owner_uid: int | None = None
    owner_gid: int | None = None

    def __post_init__(self) -> None:
        _check_id(self.owner_uid, "owner_uid")
        _check_id(self.owner_gid, "owner_gid")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type}
        _put(d, "host_path", self.host_path)
        _put(d, "readonly", self.readonly)
        if self.owner_uid is not None:
            d["owner_uid"] = self.owner_uid
        if self.owner_gid is not None:
            d["owner_gid"] = self.owner_gid
        return d


@dataclass
class VFSHookRule:
    """A file-operation interception rule (accepted by the types; not served by this
    project's `matchlock rpc`, which refuses `vfs.interception` with a clear error)."""

    name: str = ""
    phase: VFSHookPhase = ""
    ops: list[VFSHookOp] = field(default_factory=list)
    path: str = ""
    action: VFSHookAction = "allow"
    timeout_ms: int = 0
    hook: Callable[[VFSHookEvent], Any] | None = None
    dangerous_hook: Callable[[Any, VFSHookEvent], Any] | None = None
    mutate_hook: Callable[[VFSMutateRequest], bytes | str | None] | None = None
    action_hook: Callable[[VFSActionRequest], VFSHookAction] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"action": self.action}
        for key in ("name", "phase", "ops", "path"):
            _put(d, key, getattr(self, key))
        if self.timeout_ms > 0:
            d["timeout_ms"] = self.timeout_ms
        return d


@dataclass
class VFSInterceptionConfig:
    emit_events: bool = False
    rules: list[VFSHookRule] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        _put(d, "emit_events", self.emit_events)
        if self.rules:
            d["rules"] = [r.to_dict() for r in self.rules]
        return d


@dataclass
class NetworkBodyTransform:
    """A literal find/replace on a response body."""

    find: str
    replace: str = ""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"find": self.find}
        _put(d, "replace", self.replace)
        return d


@dataclass
class NetworkHookRequest:
    """What an SDK-local network callback sees (never a secret's value)."""

    phase: NetworkHookPhase = ""
    host: str = ""
    method: str = ""
    path: str = ""
    query: dict[str, str] | None = None
    request_headers: dict[str, list[str]] | None = None
    status_code: int = 0
    response_headers: dict[str, list[str]] | None = None
    is_sse: bool = False


@dataclass
class NetworkHookRequestMutation:
    headers: dict[str, list[str]] | None = None
    query: dict[str, str] | None = None
    path: str = ""


@dataclass
class NetworkHookResponseMutation:
    headers: dict[str, list[str]] | None = None
    body_replacements: list[NetworkBodyTransform] = field(default_factory=list)
    set_body: bytes | str | None = None


@dataclass
class NetworkHookResult:
    action: NetworkHookAction = "allow"
    request: NetworkHookRequestMutation | None = None
    response: NetworkHookResponseMutation | None = None


_RULE_FIELDS = ("name", "phase", "hosts", "methods", "path")
_RULE_MUTATIONS = ("set_headers", "delete_headers", "set_query", "delete_query", "rewrite_path",
                   "set_response_headers", "delete_response_headers")


@dataclass
class NetworkHookRule:
    """An HTTP interception rule: match (hosts, methods, path globs), then allow, block or
    mutate; with `hook`, a callback in this process decides."""

    name: str = ""
    phase: NetworkHookPhase = ""
    hosts: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    path: str = ""
    action: NetworkHookAction = "allow"
    set_headers: dict[str, str] = field(default_factory=dict)
    delete_headers: list[str] = field(default_factory=list)
    set_query: dict[str, str] = field(default_factory=dict)
    delete_query: list[str] = field(default_factory=list)
    rewrite_path: str = ""
    set_response_headers: dict[str, str] = field(default_factory=dict)
    delete_response_headers: list[str] = field(default_factory=list)
    body_replacements: list[NetworkBodyTransform] = field(default_factory=list)
    timeout_ms: int = 0
    hook: Callable[[NetworkHookRequest], NetworkHookResult | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"action": self.action}
        for key in (*_RULE_FIELDS, *_RULE_MUTATIONS):
            _put(d, key, getattr(self, key))
        if self.body_replacements:
            d["body_replacements"] = [x.to_dict() for x in self.body_replacements]
        if self.timeout_ms > 0:
            d["timeout_ms"] = self.timeout_ms
        return d


@dataclass
class NetworkInterceptionConfig:
    rules: list[NetworkHookRule] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"rules": [r.to_dict() for r in self.rules]} if self.rules else {}


@dataclass
class VFSMutateRequest:
    path: str
    size: int
    mode: int
    uid: int
    gid: int


@dataclass
class VFSActionRequest:
    op: str
    path: str
    size: int
    mode: int
    uid: int
    gid: int


@dataclass
class VFSHookEvent:
    op: str
    path: str
    size: int
    mode: int
    uid: int
    gid: int


@dataclass
class Secret:
    """A secret: the guest sees only a placeholder in $name; the proxy puts the value into
    requests to `hosts`."""

    name: str
    value: str
    hosts: list[str] = field(default_factory=list)
    placeholder: str = field(default="", kw_only=True)


@dataclass
class ImageConfig:
    """Overrides of the image's USER, WORKDIR, ENTRYPOINT, CMD and ENV."""

    user: str = ""
    working_dir: str = ""
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for key in ("user", "working_dir", "entrypoint", "cmd", "env"):
            _put(d, key, getattr(self, key))
        return d


@dataclass
class PortForward:
    local_port: int
    remote_port: int


@dataclass
class PortForwardBinding:
    address: str
    local_port: int
    remote_port: int


@dataclass
class HostIPMapping:
    """A name → address line in the guest's /etc/hosts."""

    host: str
    ip: str


@dataclass
class CreateOptions:
    """Everything `Client.create` sends (see `Sandbox` for the builder)."""

    image: str = ""
    kernel_ref: str = ""
    privileged: bool = False
    cpus: float = 0
    memory_mb: int = 0
    disk_size_mb: int = 0
    timeout_seconds: int = 0
    allowed_hosts: list[str] = field(default_factory=list)
    add_hosts: list[HostIPMapping] = field(default_factory=list)
    block_private_ips: bool = False
    block_private_ips_set: bool = False
    no_network: bool = False
    force_interception: bool = False
    network_interception: NetworkInterceptionConfig | None = None
    mounts: dict[str, MountConfig] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    vfs_interception: VFSInterceptionConfig | None = None
    secrets: list[Secret] = field(default_factory=list)
    workspace: str = ""
    dns_servers: list[str] = field(default_factory=list)
    hostname: str = ""
    network_mtu: int = 0
    port_forwards: list[PortForward] = field(default_factory=list)
    port_forward_addresses: list[str] = field(default_factory=list)
    image_config: ImageConfig | None = None
    launch_entrypoint: bool = False


@dataclass
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str
    duration_ms: int


@dataclass
class ExecStreamResult:
    exit_code: int
    duration_ms: int


@dataclass
class ExecPipeResult:
    exit_code: int
    duration_ms: int


@dataclass
class ExecInteractiveResult:
    exit_code: int
    duration_ms: int


@dataclass
class FileInfo:
    name: str
    size: int
    mode: int
    is_dir: bool


@dataclass
class VolumeInfo:
    name: str
    size: str
    path: str


class RPCError(MatchlockError):
    """An error answer from `matchlock rpc`: its JSON-RPC code and message."""

    # The codes are the server's (rpc/protocol.py), under the official SDK's names.
    PARSE_ERROR = _codes.PARSE_ERROR
    INVALID_REQUEST = _codes.INVALID_REQUEST
    METHOD_NOT_FOUND = _codes.METHOD_NOT_FOUND
    INVALID_PARAMS = _codes.INVALID_PARAMS
    INTERNAL_ERROR = _codes.INTERNAL
    VM_FAILED = _codes.VM_FAILED
    EXEC_FAILED = _codes.EXEC_FAILED
    FILE_FAILED = _codes.FILE_FAILED

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"

    def is_vm_error(self) -> bool:
        return self.code == self.VM_FAILED

    def is_exec_error(self) -> bool:
        return self.code == self.EXEC_FAILED

    def is_file_error(self) -> bool:
        return self.code == self.FILE_FAILED

