"""`--secret-file`: parsing, reading, and errors that never show the value (or the path)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from matchlock.cli.run import compose_env, hide_from_children
from matchlock.errors import MatchlockError
from matchlock.net.secret_sources import MAX_SECRET_FILE, parse_secret_file, read_secret_file
from matchlock.sandbox.network import Egress, NetworkOptions

VALUE = "sk-live-Abc123@x,y=z/+=="


def _file(tmp_path: Path, data: bytes, name: str = "token") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def _assert_clean(message: str, *also: str) -> None:
    for needle in (VALUE, *also):
        assert needle not in message, message


def test_value_is_the_content_minus_one_line_ending(tmp_path: Path) -> None:
    for data in (VALUE.encode(), VALUE.encode() + b"\n", VALUE.encode() + b"\r\n"):
        s = parse_secret_file(f"API_KEY={_file(tmp_path, data)}@api.example.com,*.example.org")
        assert (s.name, s.value, s.hosts) == ("API_KEY", VALUE,
                                                ("api.example.com", "*.example.org"))
        assert s.placeholder.startswith("SANDBOX_SECRET_")
        assert VALUE not in repr(s)


def test_only_one_trailing_newline_goes_and_leading_space_stays(tmp_path: Path) -> None:
    assert read_secret_file("K", str(_file(tmp_path, b"  v  \n"))) == "  v  "
    with pytest.raises(ValueError, match="one line"):
        read_secret_file("K", str(_file(tmp_path, b"v\n\n")))


def test_spec_splits_at_the_last_at_so_paths_may_hold_one(tmp_path: Path) -> None:
    d = tmp_path / "user@example"
    d.mkdir()
    path = _file(d, b"v@lue-with-at\n", "k=1")
    s = parse_secret_file(f"K={path}@h.com")
    assert (s.value, s.hosts) == ("v@lue-with-at", ("h.com",))


def test_unicode_value(tmp_path: Path) -> None:
    assert read_secret_file("K", str(_file(tmp_path, "pässwört\n".encode()))) == "pässwört"


def test_symlink_to_a_regular_file_is_fine(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(_file(tmp_path, b"v\n"))
    assert read_secret_file("K", str(link)) == "v"  # (a Secret needs more; not checked here)


def test_short_values_are_refused_by_the_secret_rules(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="secret K: the value has 5 characters") as exc:
        parse_secret_file(f"K={_file(tmp_path, b'xq7zk')}@h.com")
    _assert_clean(str(exc.value), "xq7zk")


def test_exactly_the_limit_is_accepted(tmp_path: Path) -> None:
    data = b"a" * MAX_SECRET_FILE
    assert len(read_secret_file("K", str(_file(tmp_path, data)))) == MAX_SECRET_FILE
    # The stripped newline does not count towards the limit's purpose, but the file size does.
    with pytest.raises(ValueError, match="larger than 64 KiB"):
        read_secret_file("K", str(_file(tmp_path, data + b"\n")))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing", "cannot open the file: No such file or directory"),
        (lambda d: _file(d, b""), "the file is empty"),
        (lambda d: _file(d, b"\n"), "the file is empty"),
        (lambda d: _file(d, b"\r\n"), "the file is empty"),
        (lambda d: _file(d, b"x" * (MAX_SECRET_FILE + 1)), "larger than 64 KiB"),
        (lambda d: _file(d, b"line one\nline two\n"), "must be one line"),
        (lambda d: _file(d, b"a\rb"), "must be one line"),
        (lambda d: _file(d, b"a\0b"), "must be one line"),
        (lambda d: _file(d, b"\xffabc"), "not UTF-8 text"),
        (lambda d: d, "not a regular file"),
        (lambda d: Path("/dev/null"), "not a regular file"),
    ],
)
def test_errors_name_the_secret_not_the_path_or_value(make: object, message: str,
                                                      tmp_path: Path) -> None:
    assert callable(make)
    path = make(tmp_path)
    with pytest.raises(ValueError) as exc:
        parse_secret_file(f"MY_KEY={path}@h.com")
    text = str(exc.value)
    assert text.startswith("--secret-file MY_KEY: ") and message in text, text
    _assert_clean(text, str(path))


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        read_secret_file("K", str(fifo))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    path = _file(tmp_path, b"v")
    path.chmod(0)
    with pytest.raises(ValueError, match="K: cannot open the file: Permission denied"):
        read_secret_file("K", str(path))


@pytest.mark.parametrize(
    "spec",
    [
        "K",
        f"K={VALUE}",  # no '@host': the value is not echoed, whatever follows its last '@'
        "K@h.com",  # the --secret form: no path
        "K=@h.com",
        f"={VALUE}@h.com",
        f"1K={VALUE}@h.com",
        f"BAD NAME={VALUE}@h.com",
        f"K={VALUE}@",
        f"K={VALUE}@ , ",
        f"{VALUE}",
        f"K={VALUE}@h.com",  # a value given where the path belongs
    ],
)
def test_bad_specs_never_echo_the_value(spec: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_secret_file(spec)
    _assert_clean(str(exc.value), "sk-live", "Abc123")


def test_bad_hosts_are_refused_after_reading(tmp_path: Path) -> None:
    path = _file(tmp_path, VALUE.encode())
    for hosts, message in (("h.com:443", "must not have a port"), ("10.0.0.1", "IP addresses"),
                           ("a..com", "invalid label")):
        with pytest.raises(ValueError, match=message) as exc:
            parse_secret_file(f"K={path}@{hosts}")
        _assert_clean(str(exc.value))


# --- wired into Egress (no root needed: nothing is started) -------------------------------


def test_egress_takes_file_secrets_and_allows_their_hosts(tmp_path: Path) -> None:
    path = _file(tmp_path, VALUE.encode() + b"\n")
    egress = Egress(NetworkOptions(secret_files=[f"FILE_KEY={path}@api.example.com"],
                                   secrets=["ENV_KEY@env.example.com", "INLINE=x1234567@i.com"]),
                    environ={"ENV_KEY": "from-env-1234"})
    env = egress.guest_env()
    assert env["FILE_KEY"].startswith("SANDBOX_SECRET_") and VALUE not in env.values()
    assert egress.policy.check("api.example.com", 443).allowed
    assert egress.environ_secret_names == ("ENV_KEY",)
    assert VALUE not in repr(egress.secrets)


def test_egress_errors_never_echo_values(tmp_path: Path) -> None:
    path = _file(tmp_path, VALUE.encode())
    cases: list[NetworkOptions] = [
        NetworkOptions(secret_files=[f"K={tmp_path / 'nope'}@h.com"]),
        NetworkOptions(secret_files=[f"K={VALUE}@h.com"]),
        NetworkOptions(secrets=[f"BAD NAME={VALUE}@h.com"]),
        NetworkOptions(secrets=[f"K={VALUE}@"]),
        # The same name twice, once from each source.
        NetworkOptions(secrets=[f"K={VALUE}@h.com"], secret_files=[f"K={path}@h.com"]),
    ]
    for opts in cases:
        with pytest.raises(MatchlockError) as exc:
            Egress(opts, environ={})
        _assert_clean(str(exc.value), "sk-live")


def test_an_environment_value_that_is_not_utf8_is_refused_without_quoting_it() -> None:
    value = os.fsdecode(b"sk-\xff\xfe-live")  # how Python shows undecodable environment bytes
    with pytest.raises(MatchlockError) as exc:
        Egress(NetworkOptions(secrets=["K@h.com"]), environ={"K": value})
    assert str(exc.value) == "invalid --secret: the value of K is not UTF-8"


# --- the CLI layer ------------------------------------------------------------------------


def test_hide_from_children_and_moot_env_flags(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    monkeypatch.setenv("ML_TEST_SECRET", VALUE)
    monkeypatch.setenv("ML_TEST_OTHER", "kept")
    hide_from_children(["ML_TEST_SECRET"])
    assert "ML_TEST_SECRET" not in os.environ and os.environ["ML_TEST_OTHER"] == "kept"
    env_file = tmp_path / "env"
    env_file.write_text("ML_TEST_SECRET\nML_TEST_OTHER\n")
    placeholder = "SANDBOX_SECRET_" + "0" * 32
    env = compose_env((), (str(env_file),), ("ML_TEST_SECRET", "ML_TEST_SECRET=x"), "h", False,
                      {"ML_TEST_SECRET": placeholder})
    assert f"ML_TEST_SECRET={placeholder}" in env and "ML_TEST_OTHER=kept" in env
    # Without a secret of that name, a missing host variable is still an error.
    with pytest.raises(MatchlockError, match="ML_TEST_SECRET is not set"):
        compose_env((), (), ("ML_TEST_SECRET",), "h", False, {})


def test_a_value_given_without_a_name_is_not_echoed() -> None:
    value = "AKIA0EXAMPLE0VALUE0123"  # a valid variable name, as many key formats are
    with pytest.raises(MatchlockError) as exc:
        Egress(NetworkOptions(secrets=[f"{value}@h.com"]), environ={})
    assert value not in str(exc.value)
