"""Choosing the image of an index for the host platform, and checking image configs."""

from __future__ import annotations

import pytest

from matchlock.errors import ImageError
from matchlock.image.oci import OCI_INDEX, OCI_MANIFEST, Descriptor, Platform
from matchlock.image.platforms import (
    check_config_platform,
    host_platform,
    normalize,
    parse_platform,
    select_manifest,
)

DIGEST = "sha256:" + "0" * 63


def desc(n: int, platform: str | None, media_type: str = OCI_MANIFEST) -> Descriptor:
    p = None
    if platform is not None:
        parts = platform.split("/")
        p = Platform(parts[0], parts[1], parts[2] if len(parts) > 2 else None)
    return Descriptor(media_type, f"{DIGEST}{n}", 100, p)


AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64", "v8")


def test_exact_platform_is_chosen_in_index_order() -> None:
    index = [desc(1, "linux/arm64/v8"), desc(2, "linux/amd64"), desc(3, "linux/amd64")]
    assert select_manifest(index, AMD64, "x").digest.endswith("2")
    assert select_manifest(index, ARM64, "x").digest.endswith("1")


def test_arm64_without_variant_is_v8() -> None:
    assert select_manifest([desc(1, "linux/arm64")], ARM64, "x").digest.endswith("1")
    index = [desc(1, "linux/arm/v7"), desc(2, "linux/arm64/v8")]
    assert select_manifest(index, Platform("linux", "arm64"), "x").digest.endswith("2")


def test_arm_variants_fall_back_to_older_ones() -> None:
    v7 = Platform("linux", "arm", "v7")
    assert select_manifest([desc(1, "linux/arm/v6"), desc(2, "linux/arm/v5")], v7,
                           "x").digest.endswith("1")
    with pytest.raises(ImageError):
        select_manifest([desc(1, "linux/arm/v7")], Platform("linux", "arm", "v6"), "x")


def test_amd64_accepts_v1_but_not_higher_levels() -> None:
    assert select_manifest([desc(1, "linux/amd64/v1")], AMD64, "x").digest.endswith("1")
    assert select_manifest([desc(1, "linux/amd64/v3"), desc(2, "linux/amd64")], AMD64,
                           "x").digest.endswith("2")


def test_attestations_and_other_os_are_skipped() -> None:
    index = [desc(1, "unknown/unknown"), desc(2, "windows/amd64"), desc(3, "linux/amd64"),
             desc(4, "linux/amd64", "application/vnd.in-toto+json")]
    assert select_manifest(index, AMD64, "x").digest.endswith("3")


def test_nested_index_entries_are_candidates() -> None:
    assert select_manifest([desc(1, "linux/amd64", OCI_INDEX)], AMD64, "x").media_type == OCI_INDEX


def test_single_unmarked_entry_is_taken() -> None:
    assert select_manifest([desc(1, None)], AMD64, "x").digest.endswith("1")


def test_no_match_names_what_is_offered() -> None:
    with pytest.raises(ImageError) as caught:
        select_manifest([desc(1, "linux/arm64"), desc(2, "linux/ppc64le"),
                         desc(3, "unknown/unknown")], AMD64, "image x:1")
    text = str(caught.value)
    assert "image x:1 has no image for linux/amd64" in text
    assert "linux/arm64/v8, linux/ppc64le, unknown/unknown" in text


def test_normalize_and_parse() -> None:
    assert normalize(Platform("Linux", "x86_64")) == AMD64
    assert normalize(Platform("linux", "aarch64")) == ARM64
    assert normalize(Platform("linux", "amd64", "v1")) == AMD64
    assert parse_platform("linux/arm64") == ARM64
    assert parse_platform("linux/arm/v7") == Platform("linux", "arm", "v7")
    for bad in ("linux", "linux/", "a/b/c/d", "/amd64"):
        with pytest.raises(ImageError, match="invalid platform"):
            parse_platform(bad)


def test_host_platform_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATCHLOCK_PLATFORM", "linux/arm64")
    assert host_platform() == ARM64
    monkeypatch.delenv("MATCHLOCK_PLATFORM")
    assert host_platform().os == "linux"


def test_config_platform_check() -> None:
    check_config_platform("linux", "amd64", None, AMD64, "config")
    check_config_platform(None, None, None, AMD64, "config")  # very old configs
    check_config_platform("linux", "arm64", None, ARM64, "config")
    with pytest.raises(ImageError, match="built for linux/arm64/v8; matchlock runs linux/amd64"):
        check_config_platform("linux", "arm64", None, AMD64, "config")
    with pytest.raises(ImageError, match="windows/amd64"):
        check_config_platform("windows", "amd64", None, AMD64, "config")
