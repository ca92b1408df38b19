"""A warm pool serves exactly its own configuration (no VM: matching and refusals only; the
members themselves are tested in tests/integration/test_pool.py)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from matchlock import (
    Client,
    Config,
    CreateOptions,
    ImageConfig,
    MatchlockError,
    MountConfig,
    NetworkHookRule,
    NetworkInterceptionConfig,
    Pool,
    Sandbox,
)

CFG = Config(binary_path="/nonexistent/matchlock")


def base() -> Sandbox:
    return (Sandbox("alpine:latest").with_memory(256).allow_host("api.test")
            .add_secret("TOKEN", "value-a", "api.test").with_env("A", "1"))


VARIANTS: dict[str, Callable[[Sandbox], Sandbox]] = {
    "image": lambda s: _retag(s, "alpine:3.19"),
    "image config": lambda s: s.with_image_config(ImageConfig(working_dir="/srv")),
    "secret value": lambda s: s.add_secret("TOKEN", "value-b", "api.test"),
    "secret hosts": lambda s: s.add_secret("TOKEN", "value-a", "api.test", "other.test"),
    "another secret": lambda s: s.add_secret("OTHER", "value-a", "api.test"),
    "allow-list": lambda s: s.allow_host("other.test"),
    "private ranges": lambda s: s.allow_private_ips(),
    "add-host": lambda s: s.add_host("api.test", "10.0.0.1"),
    "dns": lambda s: s.with_dns_servers("10.0.0.53"),
    "env": lambda s: s.with_env("A", "2"),
    "memory": lambda s: s.with_memory(512),
    "cpus": lambda s: s.with_cpus(2),
    "disk": lambda s: s.with_disk_size(1024),
    "timeout": lambda s: s.with_timeout(60),
    "hostname": lambda s: s.with_hostname("box"),
    "user": lambda s: s.with_user("nobody"),
    "entrypoint": lambda s: s.with_entrypoint("sleep", "1"),
    "privileged": lambda s: s.with_privileged(),
    "mount": lambda s: s.mount_memory("/scratch"),
    "host mount": lambda s: s.mount("/data", MountConfig(type="host_fs", host_path="/tmp")),
    "port forward": lambda s: s.with_port_forward(8080, 80),
}


def _retag(s: Sandbox, image: str) -> Sandbox:
    s.options().image = image
    return s


def test_only_the_exact_configuration_matches() -> None:
    pool = Pool(base(), size=1, config=CFG)
    assert pool.matches(CFG, _launched(base()))
    for name, change in VARIANTS.items():
        assert not pool.matches(CFG, _launched(change(base()))), name
    # created without the entrypoint (`create`, not `launch`), or by another binary
    assert not pool.matches(CFG, base().options())
    assert not pool.matches(Config(binary_path="/other/matchlock"), _launched(base()))
    assert not pool.matches(Config(binary_path=CFG.binary_path, use_sudo=True),
                            _launched(base()))
    assert Pool(base(), config=CFG, launch=False).matches(CFG, base().options())


def _launched(s: Sandbox) -> CreateOptions:
    opts = s.options()
    opts.launch_entrypoint = True
    return opts


def test_a_later_change_to_the_builder_does_not_change_the_pool() -> None:
    sb = base()
    pool = Pool(sb, config=CFG)
    sb.allow_host("other.test")
    assert pool.matches(CFG, _launched(base()))
    assert not pool.matches(CFG, _launched(sb))


def test_refusals() -> None:
    with pytest.raises(MatchlockError, match="at least 1"):
        Pool(base(), size=0, config=CFG)
    hook = NetworkHookRule(name="cb", hook=lambda req: None)
    with pytest.raises(MatchlockError, match="hook callbacks"):
        Pool(base().with_network_interception(NetworkInterceptionConfig(rules=[hook])),
             config=CFG)
    with pytest.raises(MatchlockError, match="image is required"):
        Pool(Sandbox(""), config=CFG)


def test_an_empty_or_closed_pool_hands_out_nothing() -> None:
    pool = Pool(base(), config=CFG)
    assert pool.take(CFG, _launched(base())) is None  # nothing ready: the caller boots cold
    pool.close()
    pool.close()
    with pytest.raises(MatchlockError, match="closed"):
        pool.start()
    # a client with a pool starts no process before create/launch
    c = Client(CFG, pool=pool)
    c.start()
    assert c._rpc is None
    c.close()


@pytest.mark.parametrize("binary", ["/nonexistent/matchlock", "/bin/false"])
def test_a_member_that_cannot_start_is_reported_not_retried_hot(binary: str) -> None:
    pool = Pool(base(), config=Config(binary_path=binary))
    pool.start()
    t0 = time.monotonic()
    assert not pool.wait_ready(timeout=30)
    assert time.monotonic() - t0 < 10  # it returned at the failure, not at the timeout
    assert isinstance(pool.last_error, MatchlockError)
    assert pool.ready == 0 and pool.member_ids() == []
    t0 = time.monotonic()
    pool.close()  # also while the filler waits before its next attempt
    assert time.monotonic() - t0 < 5
