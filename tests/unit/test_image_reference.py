"""Image reference parsing with Docker's normalization rules."""

from __future__ import annotations

import pytest

from matchlock.errors import ImageError
from matchlock.image.reference import Reference, parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("busybox", ("docker.io", "library/busybox", "latest", None)),
        ("busybox:1.36", ("docker.io", "library/busybox", "1.36", None)),
        ("library/busybox", ("docker.io", "library/busybox", "latest", None)),
        ("docker.io/busybox", ("docker.io", "library/busybox", "latest", None)),
        ("index.docker.io/library/busybox", ("docker.io", "library/busybox", "latest", None)),
        ("user/app:v1", ("docker.io", "user/app", "v1", None)),
        ("ghcr.io/org/team/app:1.0-rc.1", ("ghcr.io", "org/team/app", "1.0-rc.1", None)),
        ("127.0.0.1:5000/x/y:tag", ("127.0.0.1:5000", "x/y", "tag", None)),
        ("127.0.0.1:5000/x/y", ("127.0.0.1:5000", "x/y", "latest", None)),
        ("localhost/app", ("localhost", "app", "latest", None)),
        ("localhost:5000/app:t", ("localhost:5000", "app", "t", None)),
        ("[::1]:5000/app:t", ("[::1]:5000", "app", "t", None)),
        (f"busybox@{DIGEST}", ("docker.io", "library/busybox", None, DIGEST)),
        (f"busybox:1.36@{DIGEST}", ("docker.io", "library/busybox", "1.36", DIGEST)),
        ("my_app/a__b-c--d.v2:T_1", ("docker.io", "my_app/a__b-c--d.v2", "T_1", None)),
        ("matchlock-builtin:busybox", ("docker.io", "library/matchlock-builtin", "busybox", None)),
    ],
)
def test_valid(text: str, expected: tuple[str, str, str | None, str | None]) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == expected


def test_canonical_and_str() -> None:
    ref = parse_reference("busybox")
    assert ref.canonical == str(ref) == "docker.io/library/busybox:latest"
    assert ref.name == "docker.io/library/busybox"
    pinned = parse_reference(f"127.0.0.1:5000/x:t@{DIGEST}")
    assert str(pinned) == f"127.0.0.1:5000/x:t@{DIGEST}"
    assert parse_reference(str(pinned)) == pinned
    assert (
        parse_reference(ref.canonical)
        == ref
        == Reference("docker.io", "library/busybox", "latest", None)
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        " busybox",
        "busy box",
        "BusyBox",
        "library/BusyBox",
        "busybox:",
        "busybox:-tag",
        "busybox:" + "t" * 129,
        "busybox@sha256:abc",
        "busybox@md5:" + "0" * 32,
        "busybox@sha256:" + "AB" * 32,
        "/busybox",
        "busybox/",
        "a//b",
        "-app",
        "app-",
        "a..b",
        "a.-b",
        "host:99999/app",
        "host:port/app",
        "[not-ipv6]:5000/app",
        "-bad.host/app",
        "x" * 256,
        "app:tag:more",
        "my_app.v2/x",
    ],
)
def test_invalid(text: str) -> None:
    with pytest.raises(ImageError, match="invalid image reference"):
        parse_reference(text)


def test_error_is_one_actionable_line() -> None:
    with pytest.raises(ImageError) as info:
        parse_reference("Not Valid")
    assert "\n" not in str(info.value) and "NAME[:TAG]" in str(info.value)
