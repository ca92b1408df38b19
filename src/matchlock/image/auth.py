"""Registry authentication: answering `WWW-Authenticate` challenges.

- `Basic`: send the user's credentials with every request.
- `Bearer` (the Docker token flow): ask the challenge's realm for a token for the scope
  (`repository:<name>:pull`), anonymously or with the user's credentials (HTTP basic auth, or
  an OAuth2 refresh-token grant for an identity token), then send `Authorization: Bearer`.

Request building and response parsing are pure functions; `Authenticator` adds the I/O and is
shared by the download threads of one pull.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from matchlock.errors import ImageError
from matchlock.image.challenge import Challenge, parse_challenges
from matchlock.image.credentials import Credentials
from matchlock.image.registry_config import is_loopback

CLIENT_ID = "matchlock"
_MAX_TOKEN_BYTES = 1 << 20


class Unauthorized(ImageError):
    """The registry or its token service refused our credentials (or lack of them)."""


@dataclass(frozen=True)
class TokenRequest:
    method: str  # GET (anonymous or basic auth) or POST (OAuth2 refresh token)
    url: str
    params: dict[str, str]
    form: dict[str, str] | None
    basic: tuple[str, str] | None


def basic_header(creds: Credentials) -> str:
    raw = f"{creds.username}:{creds.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def pick_challenge(challenges: list[Challenge]) -> Challenge | None:
    """Bearer wins over Basic (a registry offering both prefers tokens); others are ignored."""
    for scheme in ("bearer", "basic"):
        for c in challenges:
            if c.scheme == scheme:
                return c
    return None


def token_request(challenge: Challenge, scope: str, creds: Credentials | None) -> TokenRequest:
    """The request that gets a bearer token for `scope` (the challenge's own scope wins)."""
    realm = challenge.get("realm")
    if not realm or urlsplit(realm).scheme not in ("http", "https") or not urlsplit(realm).netloc:
        raise ImageError(
            f"the registry's token challenge names no usable realm ({realm!r})",
            hint="the registry is misconfigured; report it to its operator",
        )
    wanted = challenge.get("scope") or scope
    service = challenge.get("service")
    if creds is not None and creds.identity_token:
        form = {
            "grant_type": "refresh_token",
            "refresh_token": creds.identity_token,
            "client_id": CLIENT_ID,
            "scope": wanted,
        }
        if service:
            form["service"] = service
        return TokenRequest("POST", realm, {}, form, None)
    params = {"scope": wanted}
    if service:
        params["service"] = service
    if creds is not None:
        params["account"] = creds.username
        return TokenRequest("GET", realm, params, None, (creds.username, creds.password))
    return TokenRequest("GET", realm, params, None, None)


def parse_token_response(body: bytes) -> str:
    """The token from a token service's JSON answer (`token`, or OAuth2's `access_token`)."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    token = None
    if isinstance(doc, dict):
        token = doc.get("token") or doc.get("access_token")
    if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
        raise ImageError(
            "the registry's token service returned no usable token",
            hint="the registry is misconfigured; report it to its operator",
        )
    return token


def _realm_is_safe(realm: str, allows_http: Callable[[str], bool]) -> bool:
    """Credentials only travel over HTTPS, or plain HTTP to loopback/insecure hosts."""
    parts = urlsplit(realm)
    return parts.scheme == "https" or is_loopback(parts.netloc) or allows_http(parts.netloc)


class Authenticator:
    """The Authorization header for one repository's requests, refreshed on challenges."""

    def __init__(
        self,
        registry: str,
        scope: str,
        credentials: Callable[[], Credentials | None],
        allows_http: Callable[[str], bool],
    ) -> None:
        self.registry = registry
        self.scope = scope
        self._credentials = credentials
        self._creds_loaded = False
        self._creds: Credentials | None = None
        self._allows_http = allows_http
        self._lock = threading.Lock()
        self._header: str | None = None
        self.generation = 0  # bumped whenever the header changes

    @property
    def credentials(self) -> Credentials | None:
        """The credentials in use, if any were looked up (for error messages)."""
        return self._creds

    def current(self) -> tuple[str | None, int]:
        with self._lock:
            return self._header, self.generation

    def _creds_once(self) -> Credentials | None:
        if not self._creds_loaded:
            self._creds = self._credentials()
            self._creds_loaded = True
        return self._creds

    def answer(self, http: httpx.Client, header_values: list[str], generation: int) -> bool:
        """Handle a 401 for a request sent with `generation`; True if retrying may help."""
        with self._lock:
            if generation != self.generation:
                return True  # another thread already refreshed the header
            challenges = [c for v in header_values for c in parse_challenges(v)]
            challenge = pick_challenge(challenges)
            if challenge is None:
                return False
            creds = self._creds_once()
            if challenge.scheme == "basic":
                if creds is None or creds.identity_token or self._header is not None:
                    return False  # nothing (else) to offer
                new = basic_header(creds)
            else:
                error = challenge.get("error")
                if self._header is not None and error not in (None, "insufficient_scope",
                                                              "invalid_token"):
                    return False
                new = "Bearer " + self._fetch_token(http, challenge, creds)
            if new == self._header:
                return False
            self._header = new
            self.generation += 1
            return True

    def _fetch_token(
        self, http: httpx.Client, challenge: Challenge, creds: Credentials | None
    ) -> str:
        request = token_request(challenge, self.scope, creds)
        if creds is not None and not _realm_is_safe(request.url, self._allows_http):
            raise ImageError(
                f"refusing to send credentials for {self.registry} to {request.url} over "
                "plain HTTP",
                hint="the token service must use HTTPS (or mark its host with "
                "--insecure-registry)",
            )
        auth = httpx.BasicAuth(*request.basic) if request.basic else None
        try:
            response = http.request(
                request.method,
                request.url,
                params=request.params,
                data=request.form,
                auth=auth,
                headers={"Accept": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise ImageError(
                f"cannot reach the token service {request.url} of {self.registry}: {exc}",
                hint="check the network and the registry's auth configuration",
            ) from None
        if response.status_code in (401, 403):
            who = f"as {creds.username!r}" if creds and creds.username else "anonymously"
            raise Unauthorized(
                f"the token service of {self.registry} refused access {who} "
                f"(HTTP {response.status_code})",
                hint=_login_hint(self.registry, creds),
            )
        if response.status_code != 200 or len(response.content) > _MAX_TOKEN_BYTES:
            raise ImageError(
                f"the token service {request.url} of {self.registry} answered HTTP "
                f"{response.status_code}",
                hint="try again later; if it persists, the registry is misconfigured",
            )
        return parse_token_response(response.content)


def _login_hint(registry: str, creds: Credentials | None) -> str:
    if creds is None:
        return (f"the image may be private: log in (`docker login {registry}` writes "
                "~/.docker/config.json) or check the image name")
    return "check the user name and password stored for it in ~/.docker/config.json"


def unauthorized(registry: str, what: str, creds: Credentials | None) -> Unauthorized:
    return Unauthorized(
        f"not authorized to pull {what} from {registry}", hint=_login_hint(registry, creds)
    )
