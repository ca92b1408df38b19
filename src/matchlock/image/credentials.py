"""Registry credentials the way Docker stores them: `~/.docker/config.json`.

Lookup order for a registry (as `docker login` writes them):
1. `credHelpers[<registry>]`: run `docker-credential-<helper> get`;
2. `auths[<registry>]`: `auth` (base64 `user:password`), or `username`/`password`, or an
   `identitytoken` (an OAuth2 refresh token);
3. `credsStore`: the default helper, for registries without an `auths` entry that has data.

Keys in `auths` may be written as a host, `https://host`, or `https://host/v1/`; they are
compared by host[:port]. Docker Hub is stored under its historical index URL.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matchlock.errors import ImageError
from matchlock.image.reference import DEFAULT_REGISTRY

# The key `docker login` uses for Docker Hub in config.json and with credential helpers.
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
_HELPER_TIMEOUT_S = 30
# A helper returns this user name when the secret is an identity (refresh) token.
_TOKEN_USER = "<token>"


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = ""
    identity_token: str = ""  # OAuth2 refresh token, used instead of the password

    def __repr__(self) -> str:  # never print secrets in tracebacks or logs
        return f"Credentials(username={self.username!r})"


def docker_config_dir() -> Path:
    env = os.environ.get("DOCKER_CONFIG")
    return Path(env) if env else Path.home() / ".docker"


def normalize_key(key: str) -> str:
    """`https://Host:5000/v1/` -> `host:5000` (how config.json keys are matched)."""
    text = key.strip()
    for scheme in ("https://", "http://"):
        if text.lower().startswith(scheme):
            text = text[len(scheme) :]
            break
    return text.split("/", 1)[0].lower()


def _lookup_key(registry: str) -> str:
    return normalize_key(DOCKER_HUB_AUTH_KEY) if registry == DEFAULT_REGISTRY else registry.lower()


def _server_url(registry: str) -> str:
    """What is passed to a credential helper on stdin."""
    return DOCKER_HUB_AUTH_KEY if registry == DEFAULT_REGISTRY else registry


def _config_error(path: Path, why: str) -> ImageError:
    return ImageError(
        f"cannot use registry credentials from {path}: {why}",
        hint="fix the file (or run `docker login` again)",
    )


def _decode_auth(value: str, path: Path) -> tuple[str, str]:
    try:
        text = base64.b64decode(value, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise _config_error(path, "an 'auth' value is not base64 of user:password") from None
    user, sep, password = text.partition(":")
    if not sep:
        raise _config_error(path, "an 'auth' value is not base64 of user:password")
    return user, password


def _from_entry(entry: dict[str, Any], path: Path) -> Credentials | None:
    token = entry.get("identitytoken")
    auth = entry.get("auth")
    user, password = entry.get("username"), entry.get("password")
    if isinstance(auth, str) and auth:
        user, password = _decode_auth(auth, path)
    if isinstance(token, str) and token:
        return Credentials(username=user if isinstance(user, str) else "", identity_token=token)
    if isinstance(user, str) and user and isinstance(password, str):
        return Credentials(username=user, password=password)
    return None


def run_helper(helper: str, registry: str) -> Credentials | None:
    """`docker-credential-<helper> get`; None when it has nothing for this registry."""
    program = f"docker-credential-{helper}"
    exe = shutil.which(program)
    if exe is None:
        raise ImageError(
            f"credential helper {program} is not installed (named in "
            f"{docker_config_dir() / 'config.json'})",
            hint=f"install {program} or remove it from the Docker config file",
        )
    try:
        result = subprocess.run(
            [exe, "get"],
            input=_server_url(registry).encode(),
            capture_output=True,
            timeout=_HELPER_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageError(
            f"credential helper {program} failed: {exc}",
            hint="check the helper, or remove it from the Docker config file",
        ) from None
    out = result.stdout.decode(errors="replace").strip()
    if result.returncode != 0:
        # The helper protocol reports a missing entry on stdout with a non-zero status.
        message = out or result.stderr.decode(errors="replace").strip()
        if "credentials not found" in message.lower():
            return None
        raise ImageError(
            f"credential helper {program} failed: {message.splitlines()[0] if message else ''}",
            hint="check the helper, or remove it from the Docker config file",
        )
    try:
        doc = json.loads(out)
        user, secret = doc["Username"], doc["Secret"]
    except (ValueError, KeyError, TypeError):
        raise ImageError(
            f"credential helper {program} returned something that is not credentials",
            hint="check the helper",
        ) from None
    if not isinstance(user, str) or not isinstance(secret, str):
        raise ImageError(f"credential helper {program} returned malformed credentials")
    if user == _TOKEN_USER:
        return Credentials(identity_token=secret)
    return Credentials(username=user, password=secret)


class DockerCredentials:
    """Credentials from one Docker config directory, read once."""

    def __init__(self, config_dir: Path | None = None) -> None:
        self.path = (config_dir or docker_config_dir()) / "config.json"
        self._doc: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._doc is None:
            try:
                doc = json.loads(self.path.read_bytes())
            except FileNotFoundError:
                doc = {}
            except OSError as exc:
                raise _config_error(self.path, exc.strerror or str(exc)) from None
            except ValueError:
                raise _config_error(self.path, "it is not valid JSON") from None
            if not isinstance(doc, dict):
                raise _config_error(self.path, "expected a JSON object")
            self._doc = doc
        return self._doc

    def _section(self, name: str) -> dict[str, Any]:
        value = self._load().get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _config_error(self.path, f"{name!r} must be an object")
        return value

    def get(self, registry: str) -> Credentials | None:
        key = _lookup_key(registry)
        helpers = {normalize_key(k): v for k, v in self._section("credHelpers").items()}
        helper = helpers.get(key)
        if isinstance(helper, str) and helper:
            return run_helper(helper, registry)
        for raw_key, entry in self._section("auths").items():
            if normalize_key(raw_key) == key and isinstance(entry, dict):
                found = _from_entry(entry, self.path)
                if found is not None:
                    return found
        store = self._load().get("credsStore")
        if isinstance(store, str) and store:
            return run_helper(store, registry)
        return None
