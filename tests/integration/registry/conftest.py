"""Real registries on loopback for the pull tests, started once per session.

- `plain_registry`: HTTP, anonymous; busybox, python:3.12-alpine, multi-arch indexes.
- `tls_registry`: HTTPS with a certificate from a test CA (`tls_files.ca_cert`).
- `basic_registry`: htpasswd basic auth (user alice).
- `token_registry`: bearer tokens from `token_server` (alice, a refresh token, public/*).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from matchlock.image.builtin import build_builtin, write_oci_layout
from matchlock.image.registry_config import RegistrySettings
from matchlock.image.store import ImageStore
from tests.integration.registry.images import make_image, skopeo_push, write_layout
from tests.integration.registry.pki import TlsFiles, TokenSigner, make_tls
from tests.integration.registry.servers import (
    REGISTRY_BIN,
    RegistryServer,
    TokenPolicy,
    TokenServer,
    htpasswd_file,
)

MATCHLOCK = str(Path(sys.executable).with_name("matchlock"))
TESTDATA = Path(os.environ.get("MATCHLOCK_TESTDATA", Path.home() / ".cache/matchlock-testdata"))
PYTHON_LAYOUT = TESTDATA / "python-3.12-alpine"
PYTHON_REF = "python-basic"
USER, PASSWORD = "alice", "s3cret-pw"
REFRESH_TOKEN = "refresh-for-alice"

CliRun = Callable[..., subprocess.CompletedProcess[str]]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    missing = [tool for tool in (REGISTRY_BIN, "skopeo", "htpasswd") if not shutil.which(tool)]
    if missing:
        skip = pytest.mark.skip(reason=f"needs {', '.join(missing)} (scripts/bootstrap.sh)")
        for item in items:
            if "registry" in str(item.fspath):
                item.add_marker(skip)


@dataclass(frozen=True)
class MultiArch:
    index: str  # digest of the linux/amd64 + arm64 + arm/v7 index ("multi:1")
    amd64: str
    arm64: str
    armv7: str
    foreign_only: str  # digest of an index without linux/amd64 ("foreign:1")


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registries")


@pytest.fixture(scope="session")
def plain_registry(work: Path) -> Iterator[RegistryServer]:
    server = RegistryServer(work / "plain")
    try:
        layout = work / "busybox-layout"
        write_oci_layout(layout)
        skopeo_push(layout, "busybox", f"{server.address}/busybox:latest")
        if (PYTHON_LAYOUT / "index.json").is_file():
            skopeo_push(PYTHON_LAYOUT, PYTHON_REF, f"{server.address}/python:3.12-alpine")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def python_pushed(plain_registry: RegistryServer) -> str:
    if not (PYTHON_LAYOUT / "index.json").is_file():
        pytest.fail(f"test data missing: {PYTHON_LAYOUT} (run scripts/testdata.sh)")
    return f"{plain_registry.address}/python:3.12-alpine"


@pytest.fixture(scope="session")
def multiarch(plain_registry: RegistryServer, work: Path) -> MultiArch:
    layer = build_builtin().layer
    amd64 = make_image([layer], arch="amd64")
    arm64 = make_image([layer], arch="arm64", variant="v8")
    armv7 = make_image([layer], arch="arm", variant="v7")
    layout = work / "multi-layout"
    index = write_layout(layout, "multi", [arm64, amd64, armv7], as_index=True)
    skopeo_push(layout, "multi", f"{plain_registry.address}/multi:1", all_images=True)
    ppc = make_image([layer], arch="ppc64le")
    foreign = write_layout(work / "foreign-layout", "foreign", [arm64, ppc], as_index=True)
    skopeo_push(work / "foreign-layout", "foreign", f"{plain_registry.address}/foreign:1",
                all_images=True)
    return MultiArch(index, amd64.digest, arm64.digest, armv7.digest, foreign)


@pytest.fixture(scope="session")
def tls_files(work: Path) -> TlsFiles:
    return make_tls(work / "pki")


@pytest.fixture(scope="session")
def tls_registry(work: Path, tls_files: TlsFiles) -> Iterator[RegistryServer]:
    server = RegistryServer(work / "tls", tls=tls_files)
    cert_dir = work / "tls-certs.d"
    cert_dir.mkdir()
    shutil.copy(tls_files.ca_cert, cert_dir / "ca.crt")
    try:
        layout = work / "busybox-layout-tls"
        write_oci_layout(layout)
        skopeo_push(layout, "busybox", f"{server.address}/busybox:latest", cert_dir=cert_dir)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def basic_registry(work: Path) -> Iterator[RegistryServer]:
    htpasswd = htpasswd_file(work / "htpasswd", {USER: PASSWORD})
    server = RegistryServer(work / "basic", htpasswd=htpasswd)
    try:
        layout = work / "busybox-layout-basic"
        write_oci_layout(layout)
        skopeo_push(layout, "busybox", f"{server.address}/team/busybox:latest",
                    creds=f"{USER}:{PASSWORD}")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def token_server(work: Path) -> Iterator[TokenServer]:
    signer = TokenSigner(work / "token-pki", "matchlock-test-issuer", "matchlock-test-registry")
    policy = TokenPolicy(users={USER: PASSWORD}, refresh_tokens={REFRESH_TOKEN: USER})
    server = TokenServer(signer, policy)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def token_registry(work: Path, token_server: TokenServer) -> Iterator[RegistryServer]:
    server = RegistryServer(work / "token", token=(token_server.realm, token_server.signer))
    try:
        layout = work / "busybox-layout-token"
        write_oci_layout(layout)
        for name in ("public/busybox:latest", "private/busybox:latest"):
            skopeo_push(layout, "busybox", f"{server.address}/{name}",
                        creds=f"{USER}:{PASSWORD}")
        yield server
    finally:
        server.stop()


# -- per test ----------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "cache" / "images")


@pytest.fixture
def docker_config(tmp_path: Path) -> Path:
    """An empty Docker config directory (tests add config.json when they need credentials)."""
    path = tmp_path / "docker"
    path.mkdir()
    return path


@pytest.fixture
def settings(docker_config: Path) -> RegistrySettings:
    return RegistrySettings(docker_config=docker_config)


@pytest.fixture
def cli_env(tmp_path: Path, docker_config: Path) -> dict[str, str]:
    """The CLI's environment: its own cache, no user config, no proxies."""
    own = ("MATCHLOCK_CACHE_DIR", "MATCHLOCK_CONFIG", "MATCHLOCK_PLATFORM")
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy") and k not in own}
    env.update(
        MATCHLOCK_CACHE_DIR=str(tmp_path / "cache"),
        MATCHLOCK_CONFIG=str(tmp_path / "config.toml"),
        DOCKER_CONFIG=str(docker_config),
    )
    return env


@pytest.fixture
def cli(cli_env: dict[str, str]) -> CliRun:
    def run(*args: str, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([MATCHLOCK, *args], capture_output=True, text=True,
                              timeout=timeout, env={**cli_env, **(env or {})})

    return run


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The error of a failed `matchlock pull -q`: exactly one line after "Pulling ..."."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if not ln.startswith("Pulling ")]
    assert len(lines) == 1 and lines[0].startswith("matchlock: "), result.stderr
    return lines[0]
