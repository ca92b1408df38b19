"""WWW-Authenticate parsing: the shapes registries send, and garbage that must not crash."""

from __future__ import annotations

import random

import pytest

from matchlock.image.challenge import Challenge, parse_challenges


def test_bearer_challenge() -> None:
    header = ('Bearer realm="https://auth.example.test/token",service="registry.example.test",'
              'scope="repository:library/alpine:pull"')
    assert parse_challenges(header) == [Challenge("bearer", {
        "realm": "https://auth.example.test/token",
        "service": "registry.example.test",
        "scope": "repository:library/alpine:pull",
    })]


def test_scheme_and_keys_are_case_insensitive_values_are_not() -> None:
    (c,) = parse_challenges('BASIC Realm="My Realm"')
    assert c.scheme == "basic" and c.params == {"realm": "My Realm"}


def test_several_challenges_in_one_header() -> None:
    header = 'Bearer realm="https://a.test/t", scope="x:y:pull,push" , Basic realm="b"'
    assert parse_challenges(header) == [
        Challenge("bearer", {"realm": "https://a.test/t", "scope": "x:y:pull,push"}),
        Challenge("basic", {"realm": "b"}),
    ]


def test_quoted_strings_with_escapes_commas_and_spaces() -> None:
    (c,) = parse_challenges(r'Bearer realm="a, \"b\" c",error="insufficient_scope"')
    assert c.params == {"realm": 'a, "b" c', "error": "insufficient_scope"}


def test_unquoted_values_and_white_space_around_equals() -> None:
    (c,) = parse_challenges("Bearer realm = https://x.test/t , service=reg")
    assert c.params == {"realm": "https://x.test/t", "service": "reg"}


def test_scheme_without_parameters() -> None:
    assert parse_challenges("Negotiate") == [Challenge("negotiate", {})]
    # A token68 credential is not a parameter list; what follows it still parses.
    assert parse_challenges("Negotiate abc==, Basic realm=x")[-1] == Challenge(
        "basic", {"realm": "x"})


def test_first_occurrence_of_a_parameter_wins() -> None:
    (c,) = parse_challenges('Bearer realm="first",realm="second"')
    assert c.params["realm"] == "first"


@pytest.mark.parametrize("header", ["", " ", ",,,", '"', 'Bearer realm="unterminated',
                                    "=", "Bearer ,,realm", "Bearer realm=", "\x00\xff"])
def test_malformed_headers_do_not_raise(header: str) -> None:
    for challenge in parse_challenges(header):
        assert challenge.scheme


def test_random_input_never_raises() -> None:
    rng = random.Random(1234)
    alphabet = 'Bearer realm="=,\\ \t\x00ab'
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        parse_challenges(text)
