"""Secret specs, placeholders and substitution; values never show up in errors or reprs."""

from __future__ import annotations

import re

import pytest

from matchlock.net.secrets import Secret, SecretLeak, SecretSet, make_secret, parse_secret

VALUE = "sk-live-Abc123@x,y=z"


def test_placeholder_format() -> None:
    s = make_secret("KEY", "value-of-key", ["a.com"])
    assert re.fullmatch(r"SANDBOX_SECRET_[0-9a-f]{32}", s.placeholder)
    assert make_secret("KEY", "value-of-key", ["a.com"]).placeholder != s.placeholder


def test_parse_from_environment() -> None:
    s = parse_secret("API_KEY@api.example.com,*.example.org", {"API_KEY": VALUE})
    assert (s.name, s.value, s.hosts) == ("API_KEY", VALUE, ("api.example.com", "*.example.org"))


def test_parse_inline_value_splits_at_last_at() -> None:
    s = parse_secret(f"K={VALUE}@h1.com,h2.com", {})
    assert s.value == VALUE and s.hosts == ("h1.com", "h2.com")
    s = parse_secret("K=a=b@c@d=e@h.com", {})
    assert s.value == "a=b@c@d=e" and s.hosts == ("h.com",)


@pytest.mark.parametrize(
    "spec",
    [
        "K",
        "K=val",
        "K@",
        "K=@h.com",
        "=v@h.com",
        "1K=v@h.com",
        "K-X=v@h.com",
        "K=v@h.com:443",
        "K=v@1..2",
        f"{VALUE}",
    ],
)
def test_bad_specs_never_echo_the_value(spec: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_secret(spec, {})
    assert VALUE not in str(exc.value) and "v@h" not in str(exc.value)
    assert "val" not in str(exc.value).replace("valid", "").replace("value", "")


def test_missing_or_empty_env_value() -> None:
    with pytest.raises(ValueError, match=r"the host variable it names is not set"):
        parse_secret("K@h.com", {})
    with pytest.raises(ValueError, match=r"--secret …@h.com: the host variable it names is not"):
        parse_secret("K@h.com", {"K": ""})


def test_value_with_line_break_refused_without_echo() -> None:
    with pytest.raises(ValueError) as exc:
        parse_secret("K=abc\r\nX-Evil: 1@h.com", {})
    assert "abc" not in str(exc.value) and "Evil" not in str(exc.value)


def test_repr_hides_value() -> None:
    s = make_secret("K", VALUE, ["h.com"])
    for text in (repr(s), str(s), repr(SecretSet([s])), repr([s]), f"{s}"):
        assert VALUE not in text
    assert "hidden" in repr(s)


def test_guest_env() -> None:
    a, b = make_secret("A", "value-one", ["a.com"]), make_secret("B", "value-two", ["b.com"])
    assert SecretSet([a, b]).guest_env() == {"A": a.placeholder, "B": b.placeholder}
    with pytest.raises(ValueError):
        SecretSet([a, make_secret("A", "value-three", ["c.com"])])


def _head(target: bytes, *headers: bytes) -> bytes:
    return (
        b"GET "
        + target
        + b" HTTP/1.1\r\nHost: x\r\n"
        + b"".join(h + b"\r\n" for h in headers)
        + b"\r\n"
    )


def test_substitution_for_valid_host_in_headers_and_target() -> None:
    s = make_secret("K", 'va lue/+="xyz', ["api.example.com"])
    p = s.placeholder.encode()
    out = SecretSet([s]).substitute_head(
        _head(b"/v1?key=" + p, b"Authorization: Bearer " + p), "api.example.com"
    )
    assert out == _head(b"/v1?key=va%20lue/+=%22xyz", b'Authorization: Bearer va lue/+="xyz')


def test_glob_hosts() -> None:
    s = make_secret("K", "value-glob", ["*.example.com"])
    p = s.placeholder.encode()
    ss = SecretSet([s])
    out = ss.substitute_head(_head(b"/", b"X: " + p), "a.example.com")
    assert out == _head(b"/", b"X: value-glob")
    assert isinstance(ss.substitute_head(_head(b"/", b"X: " + p), "example.com"), SecretLeak)


def test_placeholder_to_other_host_is_a_leak() -> None:
    a = make_secret("A", "secret-a", ["a.com"])
    b = make_secret("B", "secret-b", ["b.com"])
    ss = SecretSet([a, b])
    head = _head(b"/?x=" + b.placeholder.encode(), b"X-A: " + a.placeholder.encode())
    result = ss.substitute_head(head, "a.com")
    assert isinstance(result, SecretLeak) and result.secret_name == "B"
    assert "secret-b" not in result.reason and "B@b.com" in result.reason
    # anywhere in the head, including header names
    assert isinstance(
        ss.substitute_head(_head(b"/", a.placeholder.encode() + b": 1"), "b.com"), SecretLeak
    )


def test_no_placeholder_passes_unchanged() -> None:
    ss = SecretSet([make_secret("A", "value-x-1", ["a.com"])])
    head = _head(b"/", b"X: 1")
    assert ss.substitute_head(head, "a.com") is head
    assert SecretSet().substitute_head(head, "a.com") is head


def test_substitute_value_for_h2_fields() -> None:
    s = make_secret("K", "a b value", ["h.com"])
    ss = SecretSet([s])
    p = s.placeholder.encode()
    assert ss.substitute_value(b"Bearer " + p, "h.com") == b"Bearer a b value"
    assert ss.substitute_value(b"/x?k=" + p, "h.com", target=True) == b"/x?k=a%20b%20value"
    assert isinstance(ss.substitute_value(p, "other.com"), SecretLeak)


def test_secret_requires_hosts_and_valid_name() -> None:
    with pytest.raises(ValueError):
        Secret("K", "v", (), "SANDBOX_SECRET_" + "0" * 32)
    with pytest.raises(ValueError):
        make_secret("bad-name", "v", ["h.com"])
    with pytest.raises(ValueError):
        make_secret("K", "v", ["h.com"], placeholder="short")


# --- responses: an echoing origin must not hand the value back to the guest ---------------


def test_mask_redacts_values_with_equal_length() -> None:
    from matchlock.net.secrets import ValueMask

    m = ValueMask([b"topsecret-123"])
    out = m.all(b'{"auth": "Bearer topsecret-123"}')
    assert out == b'{"auth": "Bearer *************"}'
    assert len(out) == len(b'{"auth": "Bearer topsecret-123"}')


def test_mask_catches_a_value_split_across_writes_and_holds_back_only_a_prefix() -> None:
    from matchlock.net.secrets import ValueMask

    value = b"topsecret-123"
    for cut in range(1, len(value)):
        m = ValueMask([value])
        first = m.feed(b"data: " + value[:cut])
        assert first == b"data: "  # only the possible beginning of the value is held back
        rest = m.feed(value[cut:] + b"\n\n") + m.flush()
        assert first + rest == b"data: " + b"*" * len(value) + b"\n\n"
    m = ValueMask([value])
    assert m.feed(b"event: x\n\n") == b"event: x\n\n"  # nothing held: streams stay live


def test_values_too_short_to_be_masked_are_refused_without_echo() -> None:
    with pytest.raises(ValueError, match="at least 8") as info:
        make_secret("K", "s3cr3t", ["h.com"])
    assert "s3cr3t" not in str(info.value)
    with pytest.raises(ValueError, match="at least 8"):
        parse_secret("K=1234567@h.com", {})
    assert make_secret("K", "12345678", ["h.com"]).value == "12345678"


def test_inject_drops_accept_encoding_only_when_a_value_went_in() -> None:
    s = SecretSet([make_secret("TOKEN", "value-of-the-token", ["api.test"])])
    ph = s.guest_env()["TOKEN"].encode()
    head = (b"GET / HTTP/1.1\r\nHost: api.test\r\nAccept-Encoding: gzip\r\nX-T: " + ph
            + b"\r\n\r\n")
    out = s.inject(head, "api.test")
    assert isinstance(out, bytes)
    assert b"value-of-the-token" in out and b"Accept-Encoding" not in out
    plain = b"GET / HTTP/1.1\r\nHost: api.test\r\nAccept-Encoding: gzip\r\n\r\n"
    assert s.inject(plain, "api.test") == plain


def test_bad_host_part_is_not_quoted_it_may_be_the_end_of_a_value() -> None:
    for spec in ("K=abcdefgh@tail-of-the:value", "K=abcd@efgh@1.2.3.4", "K=xyzxyzxyz@a b"):
        with pytest.raises(ValueError, match="what follows the last '@'") as info:
            parse_secret(spec, {})
        tail = spec.rpartition("@")[2]
        assert tail not in str(info.value)
