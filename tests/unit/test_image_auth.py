"""Registry auth: token requests and answers (pure), and the challenge/refresh cycle."""

from __future__ import annotations

import base64
from urllib.parse import parse_qs

import httpx
import pytest

from matchlock.errors import ImageError
from matchlock.image.auth import (
    Authenticator,
    Unauthorized,
    basic_header,
    parse_token_response,
    pick_challenge,
    token_request,
)
from matchlock.image.challenge import Challenge
from matchlock.image.credentials import Credentials

REALM = "https://auth.example.test/token"
BEARER = Challenge("bearer", {"realm": REALM, "service": "reg.test"})


def test_anonymous_token_request() -> None:
    req = token_request(BEARER, "repository:a/b:pull", None)
    assert (req.method, req.url, req.basic, req.form) == ("GET", REALM, None, None)
    assert req.params == {"scope": "repository:a/b:pull", "service": "reg.test"}


def test_token_request_with_password_and_challenge_scope() -> None:
    challenge = Challenge("bearer", {**BEARER.params, "scope": "repository:a/b:pull,push"})
    req = token_request(challenge, "repository:a/b:pull", Credentials("u", "p"))
    assert req.basic == ("u", "p") and req.params["scope"] == "repository:a/b:pull,push"
    assert req.params["account"] == "u"


def test_token_request_with_identity_token_is_an_oauth2_refresh() -> None:
    req = token_request(BEARER, "repository:a/b:pull", Credentials("u", identity_token="rt"))
    assert req.method == "POST" and req.basic is None
    assert req.form == {"grant_type": "refresh_token", "refresh_token": "rt",
                        "client_id": "matchlock", "scope": "repository:a/b:pull",
                        "service": "reg.test"}


@pytest.mark.parametrize("realm", [None, "", "ftp://x.test/t", "not a url", "https://"])
def test_unusable_realm(realm: str | None) -> None:
    params = {"realm": realm} if realm is not None else {}
    with pytest.raises(ImageError, match="no usable realm"):
        token_request(Challenge("bearer", params), "s", None)


def test_token_responses() -> None:
    assert parse_token_response(b'{"token": "t1", "expires_in": 60}') == "t1"
    assert parse_token_response(b'{"access_token": "t2"}') == "t2"
    for bad in (b"", b"[]", b"{}", b'{"token": 5}', b'{"token": "a\\r\\nX-Evil: 1"}', b"\xff"):
        with pytest.raises(ImageError, match="no usable token"):
            parse_token_response(bad)


def test_pick_challenge_prefers_bearer() -> None:
    basic = Challenge("basic", {"realm": "r"})
    assert pick_challenge([basic, BEARER]) == BEARER
    assert pick_challenge([Challenge("negotiate"), basic]) == basic
    assert pick_challenge([Challenge("negotiate")]) is None


def test_credentials_never_show_secrets() -> None:
    creds = Credentials("alice", "hunter2", "tok")
    assert "hunter2" not in repr(creds) and "tok" not in repr(creds)
    assert basic_header(creds) == "Basic " + base64.b64encode(b"alice:hunter2").decode()


def _token_service(seen: list[httpx.Request], status: int = 200) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, json={"token": f"tok{len(seen)}"})

    return httpx.Client(transport=httpx.MockTransport(handler))


def _auth(creds: Credentials | None, realm_host_ok: bool = False) -> Authenticator:
    return Authenticator("reg.test", "repository:a/b:pull", lambda: creds,
                         lambda host: realm_host_ok)


def test_bearer_cycle_and_refresh_on_insufficient_scope() -> None:
    seen: list[httpx.Request] = []
    auth = _auth(None)
    header, generation = auth.current()
    assert header is None
    value = f'Bearer realm="{REALM}",service="reg.test"'
    assert auth.answer(_token_service(seen), [value], generation)
    assert auth.current() == ("Bearer tok1", 1)
    assert parse_qs(seen[0].url.query.decode()) == {"scope": ["repository:a/b:pull"],
                                                    "service": ["reg.test"]}
    # Another thread already refreshed: no second token request.
    assert auth.answer(_token_service(seen), [value], generation)
    assert len(seen) == 1
    # The registry says the token does not cover the scope: one more try.
    value2 = value + ',error="insufficient_scope",scope="repository:a/b:pull"'
    assert auth.answer(_token_service(seen), [value2], 1)
    assert auth.current() == ("Bearer tok2", 2)


def test_basic_answered_once_and_only_with_credentials() -> None:
    assert not _auth(None).answer(_token_service([]), ['Basic realm="r"'], 0)
    auth = _auth(Credentials("u", "p"))
    assert auth.answer(_token_service([]), ['Basic realm="r"'], 0)
    assert auth.current()[0] == basic_header(Credentials("u", "p"))
    assert not auth.answer(_token_service([]), ['Basic realm="r"'], 1)  # refused again


def test_token_service_refusal_is_unauthorized() -> None:
    auth = _auth(Credentials("u", "bad"))
    challenge = f'Bearer realm="{REALM}"'
    with pytest.raises(Unauthorized, match="refused access as 'u'"):
        auth.answer(_token_service([], status=401), [challenge], 0)


def test_credentials_never_go_to_a_plain_http_realm() -> None:
    seen: list[httpx.Request] = []
    challenge = 'Bearer realm="http://auth.example.test/token"'
    with pytest.raises(ImageError, match="refusing to send credentials"):
        _auth(Credentials("u", "p")).answer(_token_service(seen), [challenge], 0)
    assert seen == []
    # Anonymous requests may; so may loopback and insecure-marked realms.
    assert _auth(None).answer(_token_service(seen), [challenge], 0)
    assert _auth(Credentials("u", "p"), realm_host_ok=True).answer(
        _token_service(seen), [challenge], 0)
    loopback = 'Bearer realm="http://127.0.0.1:5000/token"'
    assert _auth(Credentials("u", "p")).answer(_token_service(seen), [loopback], 0)
