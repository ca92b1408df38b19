"""Docker config.json credentials: auths, helpers, credsStore."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from matchlock.errors import ImageError
from matchlock.image.credentials import (
    DOCKER_HUB_AUTH_KEY,
    Credentials,
    DockerCredentials,
    normalize_key,
)


def _config(tmp_path: Path, doc: object) -> DockerCredentials:
    (tmp_path / "config.json").write_text(json.dumps(doc))
    return DockerCredentials(tmp_path)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_no_config_means_no_credentials(tmp_path: Path) -> None:
    assert DockerCredentials(tmp_path).get("reg.test") is None


def test_docker_config_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    _config(tmp_path, {"auths": {"reg.test": {"auth": _b64("u:p")}}})
    assert DockerCredentials().get("reg.test") == Credentials("u", "p")


@pytest.mark.parametrize("key", ["reg.test:5000", "https://reg.test:5000",
                                 "http://REG.test:5000/v1/", "reg.test:5000/v2/"])
def test_auths_keys_match_by_host(tmp_path: Path, key: str) -> None:
    creds = _config(tmp_path, {"auths": {key: {"auth": _b64("u:p:with:colons")}}})
    assert creds.get("reg.test:5000") == Credentials("u", "p:with:colons")
    assert creds.get("reg.test") is None


def test_docker_hub_uses_the_index_key(tmp_path: Path) -> None:
    creds = _config(tmp_path, {"auths": {DOCKER_HUB_AUTH_KEY: {"auth": _b64("hub:pw")}}})
    assert creds.get("docker.io") == Credentials("hub", "pw")


def test_username_password_and_identity_token(tmp_path: Path) -> None:
    creds = _config(tmp_path, {"auths": {
        "a.test": {"username": "u", "password": "p"},
        "b.test": {"auth": _b64("u:"), "identitytoken": "refresh"},
        "c.test": {},
    }})
    assert creds.get("a.test") == Credentials("u", "p")
    assert creds.get("b.test") == Credentials("u", identity_token="refresh")
    assert creds.get("c.test") is None


@pytest.mark.parametrize("doc, needle", [
    ("not json", "not valid JSON"),
    ([1], "expected a JSON object"),
    ({"auths": []}, "'auths' must be an object"),
    ({"auths": {"r.test": {"auth": "!!!"}}}, "not base64"),
    ({"auths": {"r.test": {"auth": _b64("no-colon")}}}, "not base64"),
])
def test_malformed_config(tmp_path: Path, doc: object, needle: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(ImageError, match=needle):
        DockerCredentials(tmp_path).get("r.test")


def _helper(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / f"docker-credential-{name}"
    script.write_text("#!/bin/sh\nread server\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "bin"
    monkeypatch.setenv("PATH", f"{path}{os.pathsep}{os.environ.get('PATH', '')}")
    return path


def test_cred_helper_gets_the_server_on_stdin(tmp_path: Path, bin_dir: Path) -> None:
    _helper(bin_dir, "t", 'printf \'{"Username":"%s","Secret":"s"}\' "$server"\n')
    creds = _config(tmp_path, {"credHelpers": {"reg.test": "t", DOCKER_HUB_AUTH_KEY: "t"}})
    assert creds.get("reg.test") == Credentials("reg.test", "s")
    assert creds.get("docker.io") == Credentials(DOCKER_HUB_AUTH_KEY, "s")


def test_cred_helper_identity_token_and_not_found(tmp_path: Path, bin_dir: Path) -> None:
    _helper(bin_dir, "tok", 'echo \'{"Username":"<token>","Secret":"rt"}\'\n')
    _helper(bin_dir, "none", "echo 'credentials not found in native keychain'; exit 1\n")
    _helper(bin_dir, "broken", "echo 'boom'; exit 3\n")
    _helper(bin_dir, "garbage", "echo 'not json'\n")
    creds = _config(tmp_path, {"credHelpers": {"a.test": "tok", "b.test": "none",
                                               "c.test": "broken", "d.test": "garbage"}})
    assert creds.get("a.test") == Credentials(identity_token="rt")
    assert creds.get("b.test") is None
    with pytest.raises(ImageError, match="helper docker-credential-broken failed: boom"):
        creds.get("c.test")
    with pytest.raises(ImageError, match="not credentials"):
        creds.get("d.test")


def test_creds_store_is_the_fallback(tmp_path: Path, bin_dir: Path) -> None:
    _helper(bin_dir, "store", 'echo \'{"Username":"s","Secret":"p"}\'\n')
    creds = _config(tmp_path, {"credsStore": "store",
                               "auths": {"a.test": {"auth": _b64("inline:pw")}, "b.test": {}}})
    assert creds.get("a.test") == Credentials("inline", "pw")
    assert creds.get("b.test") == Credentials("s", "p")  # an entry without data: the store


def test_missing_helper_is_an_actionable_error(tmp_path: Path, bin_dir: Path) -> None:
    creds = _config(tmp_path, {"credsStore": "nowhere-to-be-found"})
    with pytest.raises(ImageError, match="docker-credential-nowhere-to-be-found is not "
                                         "installed"):
        creds.get("a.test")


def test_normalize_key() -> None:
    assert normalize_key(" HTTPS://Reg.Test:5000/v1/ ") == "reg.test:5000"
    assert normalize_key("reg.test") == "reg.test"
