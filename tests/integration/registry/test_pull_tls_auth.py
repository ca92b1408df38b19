"""TLS with a private CA, htpasswd basic auth, and the bearer-token flow, against real
docker-registry instances on loopback."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from matchlock.errors import ImageError
from matchlock.image.auth import Unauthorized
from matchlock.image.pull import pull_image
from matchlock.image.registry_config import RegistrySettings
from matchlock.image.store import ImageStore
from tests.integration.registry.conftest import (
    PASSWORD,
    REFRESH_TOKEN,
    USER,
    CliRun,
    one_error_line,
)
from tests.integration.registry.pki import TlsFiles
from tests.integration.registry.servers import RegistryServer, TokenServer


def _write_docker_config(directory: Path, doc: dict[str, object]) -> None:
    (directory / "config.json").write_text(json.dumps(doc))


def _auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


# -- TLS -----------------------------------------------------------------------------------


def test_tls_needs_the_ca(cli: CliRun, tls_registry: RegistryServer) -> None:
    error = one_error_line(cli("pull", "-q", f"{tls_registry.address}/busybox"))
    assert "TLS certificate" in error and "not trusted" in error and "--ca-cert" in error


def test_tls_with_ca_cert_flag(cli: CliRun, tls_registry: RegistryServer,
                               tls_files: TlsFiles) -> None:
    r = cli("pull", "-q", "--ca-cert", str(tls_files.ca_cert), f"{tls_registry.address}/busybox")
    assert r.returncode == 0, r.stderr


def test_tls_with_ca_in_config_file(cli: CliRun, tls_registry: RegistryServer,
                                    tls_files: TlsFiles, tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(f'[registry]\nca_certs = ["{tls_files.ca_cert}"]\n')
    r = cli("pull", "-q", f"{tls_registry.address}/busybox")
    assert r.returncode == 0, r.stderr


def test_tls_insecure_registry_skips_verification(cli: CliRun,
                                                  tls_registry: RegistryServer) -> None:
    r = cli("pull", "-q", "--insecure-registry", tls_registry.address,
            f"{tls_registry.address}/busybox")
    assert r.returncode == 0, r.stderr


def test_tls_unreadable_ca_file(cli: CliRun, tls_registry: RegistryServer,
                                tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate\n")
    error = one_error_line(cli("pull", "-q", "--ca-cert", str(bogus),
                               f"{tls_registry.address}/busybox"))
    assert f"cannot load CA certificate {bogus}" in error


def test_tls_registry_is_never_downgraded_to_http(store: ImageStore,
                                                  tls_registry: RegistryServer,
                                                  docker_config: Path) -> None:
    # Loopback may use plain HTTP, but only when the server does not speak TLS at all:
    # a certificate problem is an error, not a reason to try HTTP.
    with pytest.raises(ImageError, match="not trusted"):
        pull_image(store, f"{tls_registry.address}/busybox",
                   settings=RegistrySettings(docker_config=docker_config))


# -- basic auth ----------------------------------------------------------------------------


def test_basic_auth_anonymous_is_refused(cli: CliRun, basic_registry: RegistryServer) -> None:
    error = one_error_line(cli("pull", "-q", f"{basic_registry.address}/team/busybox"))
    assert f"not authorized to pull image {basic_registry.address}/team/busybox" in error
    assert "docker login" in error


def test_basic_auth_with_config_json(cli: CliRun, basic_registry: RegistryServer,
                                     docker_config: Path) -> None:
    _write_docker_config(docker_config, {"auths": {
        f"http://{basic_registry.address}/v1/": {"auth": _auth(USER, PASSWORD)},
    }})
    r = cli("pull", "-q", f"{basic_registry.address}/team/busybox")
    assert r.returncode == 0, r.stderr


def test_basic_auth_wrong_password(cli: CliRun, basic_registry: RegistryServer,
                                   docker_config: Path) -> None:
    _write_docker_config(docker_config, {"auths": {
        basic_registry.address: {"username": USER, "password": "wrong"},
    }})
    error = one_error_line(cli("pull", "-q", f"{basic_registry.address}/team/busybox"))
    assert "not authorized" in error and "check the user name and password" in error


def _fake_helper(directory: Path, name: str, registry: str) -> None:
    """A docker-credential-<name> that knows one registry, per the helper protocol."""
    script = directory / f"docker-credential-{name}"
    script.write_text(
        "#!/bin/sh\n"
        '[ "$1" = get ] || exit 1\n'
        "read server\n"
        f'if [ "$server" = "{registry}" ]; then\n'
        f'  echo \'{{"ServerURL":"{registry}","Username":"{USER}","Secret":"{PASSWORD}"}}\'\n'
        "else\n"
        "  echo 'credentials not found in native keychain'; exit 1\n"
        "fi\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize("key", ["credHelpers", "credsStore"])
def test_basic_auth_with_credential_helper(cli: CliRun, basic_registry: RegistryServer,
                                           docker_config: Path, tmp_path: Path,
                                           key: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_helper(bin_dir, "fake", basic_registry.address)
    value: object = {basic_registry.address: "fake"} if key == "credHelpers" else "fake"
    _write_docker_config(docker_config, {key: value})
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    r = cli("pull", "-q", f"{basic_registry.address}/team/busybox", env={"PATH": path})
    assert r.returncode == 0, r.stderr


def test_missing_credential_helper(cli: CliRun, basic_registry: RegistryServer,
                                   docker_config: Path) -> None:
    _write_docker_config(docker_config, {"credsStore": "not-installed-anywhere"})
    error = one_error_line(cli("pull", "-q", f"{basic_registry.address}/team/busybox"))
    assert "docker-credential-not-installed-anywhere is not installed" in error


# -- bearer tokens ---------------------------------------------------------------------------


def test_token_anonymous_pull_of_public_repo(store: ImageStore, settings: RegistrySettings,
                                             token_registry: RegistryServer,
                                             token_server: TokenServer) -> None:
    token_server.requests.clear()
    image = pull_image(store, f"{token_registry.address}/public/busybox", settings=settings)
    assert store.rootfs_path(image).is_file()
    assert token_server.requests
    assert all(r == {"method": "GET", "user": "", "scope": "repository:public/busybox:pull"}
               for r in token_server.requests)


def test_token_private_repo_needs_credentials(cli: CliRun, token_registry: RegistryServer) -> None:
    error = one_error_line(cli("pull", "-q", f"{token_registry.address}/private/busybox"))
    assert "not authorized" in error


def test_token_with_password(store: ImageStore, settings: RegistrySettings,
                             docker_config: Path, token_registry: RegistryServer,
                             token_server: TokenServer) -> None:
    _write_docker_config(docker_config, {"auths": {
        token_registry.address: {"auth": _auth(USER, PASSWORD)},
    }})
    token_server.requests.clear()
    pull_image(store, f"{token_registry.address}/private/busybox", settings=settings)
    assert {r["user"] for r in token_server.requests} == {USER}


def test_token_with_identity_token(store: ImageStore, settings: RegistrySettings,
                                   docker_config: Path, token_registry: RegistryServer,
                                   token_server: TokenServer) -> None:
    _write_docker_config(docker_config, {"auths": {
        token_registry.address: {"auth": _auth(USER, ""), "identitytoken": REFRESH_TOKEN},
    }})
    token_server.requests.clear()
    pull_image(store, f"{token_registry.address}/private/busybox", settings=settings)
    assert [r["method"] for r in token_server.requests] == ["POST"]


def test_token_service_refuses_bad_password(store: ImageStore, settings: RegistrySettings,
                                            docker_config: Path,
                                            token_registry: RegistryServer) -> None:
    _write_docker_config(docker_config, {"auths": {
        token_registry.address: {"auth": _auth(USER, "wrong")},
    }})
    with pytest.raises(Unauthorized, match=f"refused access as '{USER}'"):
        pull_image(store, f"{token_registry.address}/private/busybox", settings=settings)
    assert store.list() == []
