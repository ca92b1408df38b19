"""The matchlock SDK: drive sandboxes from Python through `matchlock rpc`.

Importable as `from matchlock import Client, Sandbox, ...` (the names of the official SDK) or
from `matchlock.sdk`. `AsyncClient` is the asyncio flavour.
"""

from __future__ import annotations

from matchlock.errors import MatchlockError
from matchlock.sdk import types as _types
from matchlock.sdk.aio import AsyncClient
from matchlock.sdk.builder import Sandbox
from matchlock.sdk.client import Client
from matchlock.sdk.pool import Pool
from matchlock.sdk.types import (
    Config,
    CreateOptions,
    ExecInteractiveResult,
    ExecPipeResult,
    ExecResult,
    ExecStreamResult,
    FileInfo,
    HostIPMapping,
    ImageConfig,
    MountConfig,
    NetworkBodyTransform,
    NetworkHookAction,
    NetworkHookPhase,
    NetworkHookRequest,
    NetworkHookRequestMutation,
    NetworkHookResponseMutation,
    NetworkHookResult,
    NetworkHookRule,
    NetworkInterceptionConfig,
    PortForward,
    PortForwardBinding,
    RPCError,
    Secret,
    VFSActionRequest,
    VFSHookAction,
    VFSHookEvent,
    VFSHookOp,
    VFSHookPhase,
    VFSHookRule,
    VFSInterceptionConfig,
    VFSMutateRequest,
    VolumeInfo,
)

_CONSTANTS = [n for n in dir(_types) if n.isupper() and n.startswith(("VFS_", "NETWORK_"))]
globals().update({n: getattr(_types, n) for n in _CONSTANTS})

__all__ = [
    "AsyncClient", "Client", "Config", "CreateOptions", "ExecInteractiveResult",
    "ExecPipeResult", "ExecResult", "ExecStreamResult", "FileInfo", "HostIPMapping",
    "ImageConfig", "MatchlockError", "MountConfig", "NetworkBodyTransform", "NetworkHookAction",
    "NetworkHookPhase", "NetworkHookRequest", "NetworkHookRequestMutation",
    "NetworkHookResponseMutation", "NetworkHookResult", "NetworkHookRule",
    "NetworkInterceptionConfig", "Pool", "PortForward", "PortForwardBinding", "RPCError", "Sandbox",
    "Secret", "VFSActionRequest", "VFSHookAction", "VFSHookEvent", "VFSHookOp", "VFSHookPhase",
    "VFSHookRule", "VFSInterceptionConfig", "VFSMutateRequest", "VolumeInfo", *_CONSTANTS,
]
