"""matchlock: run untrusted workloads in ephemeral microVMs with host-controlled egress.

The SDK's names (`Client`, `Sandbox`, `AsyncClient`, the option and result types) are
importable from here, as from the official SDK; they load on first use, so the CLI's start-up
does not pay for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # type checkers see the real types (at run time: __getattr__)
    from matchlock.sdk import (
        AsyncClient as AsyncClient,
    )
    from matchlock.sdk import (
        Client as Client,
    )
    from matchlock.sdk import (
        Config as Config,
    )
    from matchlock.sdk import (
        CreateOptions as CreateOptions,
    )
    from matchlock.sdk import (
        ExecInteractiveResult as ExecInteractiveResult,
    )
    from matchlock.sdk import (
        ExecPipeResult as ExecPipeResult,
    )
    from matchlock.sdk import (
        ExecResult as ExecResult,
    )
    from matchlock.sdk import (
        ExecStreamResult as ExecStreamResult,
    )
    from matchlock.sdk import (
        FileInfo as FileInfo,
    )
    from matchlock.sdk import (
        HostIPMapping as HostIPMapping,
    )
    from matchlock.sdk import (
        ImageConfig as ImageConfig,
    )
    from matchlock.sdk import (
        MatchlockError as MatchlockError,
    )
    from matchlock.sdk import (
        MountConfig as MountConfig,
    )
    from matchlock.sdk import (
        NetworkBodyTransform as NetworkBodyTransform,
    )
    from matchlock.sdk import (
        NetworkHookAction as NetworkHookAction,
    )
    from matchlock.sdk import (
        NetworkHookPhase as NetworkHookPhase,
    )
    from matchlock.sdk import (
        NetworkHookRequest as NetworkHookRequest,
    )
    from matchlock.sdk import (
        NetworkHookRequestMutation as NetworkHookRequestMutation,
    )
    from matchlock.sdk import (
        NetworkHookResponseMutation as NetworkHookResponseMutation,
    )
    from matchlock.sdk import (
        NetworkHookResult as NetworkHookResult,
    )
    from matchlock.sdk import (
        NetworkHookRule as NetworkHookRule,
    )
    from matchlock.sdk import (
        NetworkInterceptionConfig as NetworkInterceptionConfig,
    )
    from matchlock.sdk import (
        PortForward as PortForward,
    )
    from matchlock.sdk import (
        PortForwardBinding as PortForwardBinding,
    )
    from matchlock.sdk import (
        RPCError as RPCError,
    )
    from matchlock.sdk import (
        Sandbox as Sandbox,
    )
    from matchlock.sdk import (
        Secret as Secret,
    )
    from matchlock.sdk import (
        VFSActionRequest as VFSActionRequest,
    )
    from matchlock.sdk import (
        VFSHookAction as VFSHookAction,
    )
    from matchlock.sdk import (
        VFSHookEvent as VFSHookEvent,
    )
    from matchlock.sdk import (
        VFSHookOp as VFSHookOp,
    )
    from matchlock.sdk import (
        VFSHookPhase as VFSHookPhase,
    )
    from matchlock.sdk import (
        VFSHookRule as VFSHookRule,
    )
    from matchlock.sdk import (
        VFSInterceptionConfig as VFSInterceptionConfig,
    )
    from matchlock.sdk import (
        VFSMutateRequest as VFSMutateRequest,
    )
    from matchlock.sdk import (
        VolumeInfo as VolumeInfo,
    )

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    import matchlock.sdk as sdk

    if name in sdk.__all__:
        return getattr(sdk, name)
    raise AttributeError(f"module 'matchlock' has no attribute {name!r}")


def __dir__() -> list[str]:
    import matchlock.sdk as sdk

    return sorted([*globals(), *sdk.__all__])
