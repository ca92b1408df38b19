"""Pulls from a plain-HTTP docker-registry on loopback: names, platforms, cache, errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from matchlock.errors import ImageError
from matchlock.image.builtin import write_oci_layout
from matchlock.image.progress import PullProgress
from matchlock.image.pull import pull_image
from matchlock.image.registry_config import RegistrySettings
from matchlock.image.resolve import resolve_image
from matchlock.image.store import ImageStore
from tests.integration.registry.conftest import CliRun, MultiArch, one_error_line
from tests.integration.registry.images import skopeo_push
from tests.integration.registry.servers import FaultProxy, RegistryServer

PYTHON_DIGEST = "sha256:a10437c9ceddfb3b4a7a68eb3b58f0e17b9a3b2b7679ae27a0595cb1028b977e"


def test_cli_pull_tag_force_ls_rm_gc(cli: CliRun, plain_registry: RegistryServer) -> None:
    name = f"{plain_registry.address}/busybox"
    r = cli("pull", name)
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith(f"Pulling {name}...")
    lines = r.stdout.splitlines()
    assert lines[0].startswith("Digest: sha256:") and lines[1].startswith("Size: ")
    assert "root filesystem ready" in r.stderr

    again = cli("pull", name)  # cached: no registry needed
    assert again.returncode == 0 and "already in the local store" in again.stderr
    assert again.stdout == r.stdout

    forced = cli("pull", "--force", "-t", "bb:local", name)
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.splitlines() == ["Tagged: bb:local", *lines]
    assert "already present" in forced.stderr

    listed = cli("image", "ls").stdout
    assert f"{name} " in listed and "bb:local " in listed
    assert cli("image", "rm", name).returncode == 0
    assert cli("image", "gc").stdout.startswith("Freed 0.0 MB")  # bb:local still uses it
    assert cli("image", "rm", "bb:local").returncode == 0
    freed = cli("image", "gc").stdout
    assert freed.startswith("Freed ") and not freed.startswith("Freed 0.0 MB"), freed


def test_python_image_pull_builds_rootfs(store: ImageStore, settings: RegistrySettings,
                                         python_pushed: str) -> None:
    progress = PullProgress()
    image = pull_image(store, python_pushed, settings=settings, progress=progress)
    assert image.manifest_digest == PYTHON_DIGEST
    assert len(image.layers) == 5 and progress.downloaded == image.size
    assert store.rootfs_path(image).is_file()
    assert store.config(image).user == "appuser"
    assert store.lookup(python_pushed) == image
    assert list(store.tmp_dir.iterdir()) == []

    # Re-resolving finds the same manifest: nothing is downloaded or rebuilt.
    rootfs_mtime = store.rootfs_path(image).stat().st_mtime_ns
    progress = PullProgress()
    again = pull_image(store, python_pushed, settings=settings, progress=progress)
    assert again.manifest_digest == image.manifest_digest and progress.downloaded == 0
    assert store.rootfs_path(image).stat().st_mtime_ns == rootfs_mtime


def test_layers_are_shared_across_repositories(
    store: ImageStore, settings: RegistrySettings, plain_registry: RegistryServer, tmp_path: Path
) -> None:
    first = pull_image(store, f"{plain_registry.address}/busybox", settings=settings)
    layout = tmp_path / "layout"
    write_oci_layout(layout)
    skopeo_push(layout, "busybox", f"{plain_registry.address}/copies/busybox:2")
    progress = PullProgress()
    second = pull_image(store, f"{plain_registry.address}/copies/busybox:2", settings=settings,
                        progress=progress)
    assert second.layers == first.layers and progress.downloaded == 0


@pytest.mark.parametrize("platform, expected", [
    (None, "amd64"), ("linux/arm64", "arm64"), ("linux/aarch64/v8", "arm64"),
    ("linux/arm/v7", "armv7"),
])
def test_index_resolves_to_the_host_platform(
    store: ImageStore, settings: RegistrySettings, plain_registry: RegistryServer,
    multiarch: MultiArch, monkeypatch: pytest.MonkeyPatch, platform: str | None, expected: str,
) -> None:
    if platform is not None:
        monkeypatch.setenv("MATCHLOCK_PLATFORM", platform)
    else:
        monkeypatch.delenv("MATCHLOCK_PLATFORM", raising=False)
    image = pull_image(store, f"{plain_registry.address}/multi:1", settings=settings)
    assert image.manifest_digest == getattr(multiarch, expected)


def test_pull_by_digest_is_cached_under_that_reference(
    store: ImageStore, settings: RegistrySettings, plain_registry: RegistryServer,
    multiarch: MultiArch,
) -> None:
    name = f"{plain_registry.address}/multi@{multiarch.index}"
    image = pull_image(store, name, settings=settings, extra_tags=["mine:amd64"])
    assert image.manifest_digest == multiarch.amd64
    assert store.lookup(name) == image
    tagged = store.lookup("mine:amd64")
    assert tagged is not None and tagged.manifest_digest == multiarch.amd64


def test_wrong_platform_only(cli: CliRun, plain_registry: RegistryServer,
                             multiarch: MultiArch) -> None:
    error = one_error_line(cli("pull", "-q", f"{plain_registry.address}/foreign:1"))
    assert "has no image for linux/amd64" in error
    assert "linux/arm64/v8" in error and "linux/ppc64le" in error


@pytest.mark.parametrize("path, needle", [
    ("busybox:no-such-tag", "not found"),
    ("no/such-repo:1", "not found"),
])
def test_unknown_image_or_tag(cli: CliRun, plain_registry: RegistryServer, path: str,
                              needle: str) -> None:
    error = one_error_line(cli("pull", "-q", f"{plain_registry.address}/{path}"))
    assert needle in error and "MANIFEST_UNKNOWN" in error


def test_unreachable_registry(cli: CliRun) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        error = one_error_line(cli("pull", "-q", f"127.0.0.1:{port}/busybox"))
    assert f"cannot reach registry 127.0.0.1:{port}: connection refused" in error


def test_silent_registry_times_out(cli: CliRun, tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[registry]\ntimeout = 1\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)  # accepts connections (kernel backlog) but never answers
        error = one_error_line(cli("pull", "-q", f"127.0.0.1:{s.getsockname()[1]}/busybox"))
    assert "no answer within 1s" in error


def test_bad_reference_and_bad_config(cli: CliRun, tmp_path: Path) -> None:
    assert "invalid image reference" in one_error_line(cli("pull", "-q", "Bad Name"))
    (tmp_path / "config.toml").write_text("[registry]\ninsecure = 'not-a-list'\n")
    assert "invalid config file" in one_error_line(cli("pull", "-q", "127.0.0.1:1/x"))


def test_run_resolution_uses_the_cache_and_pulls_only_when_asked(
    plain_registry: RegistryServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MATCHLOCK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MATCHLOCK_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    proxy = FaultProxy(plain_registry.port)
    name = f"{proxy.address}/busybox"
    try:
        first = resolve_image(name)  # missing: pulled
        assert first.rootfs.is_file() and proxy.log
        proxy.log.clear()
        assert resolve_image(name) == first  # cached: no request at all
        assert proxy.log == []
        assert resolve_image(name, pull=True) == first  # --pull asks the registry
        assert any("/manifests/" in entry.path for entry in proxy.log)
    finally:
        proxy.stop()
    assert resolve_image(name) == first  # works with the registry gone
    with pytest.raises(ImageError, match="cannot reach registry"):
        resolve_image(name, pull=True)
