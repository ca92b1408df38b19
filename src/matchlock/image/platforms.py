"""Which image of a multi-platform index to run: the host platform, with compatible variants.

Pure logic (no I/O), so the selection rules are unit-tested on their own.
"""

from __future__ import annotations

import os
import platform as _platform  # the stdlib module
from collections.abc import Sequence

from matchlock.errors import ImageError
from matchlock.image.oci import INDEX_TYPES, MANIFEST_TYPES, Descriptor, Platform

# Architecture names as the kernel reports them (uname -m) -> OCI/Go names.
_MACHINE_ARCH: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i686": ("386", None),
    "i386": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}

# Variants a platform can run, best first. None stands for "no variant given" in the index.
# An armv7 CPU also runs v6 and v5 code; amd64 images rarely carry a variant, and an
# unmarked one is baseline x86-64 (v1), which every amd64 CPU runs.
_COMPATIBLE_VARIANTS: dict[tuple[str, str | None], tuple[str | None, ...]] = {
    ("amd64", None): (None, "v1"),
    ("amd64", "v1"): (None, "v1"),
    ("arm64", "v8"): ("v8",),  # normalize() already made "no variant" v8
    ("arm", "v7"): ("v7", "v6", "v5", None),
    ("arm", "v6"): ("v6", "v5", None),
    ("arm", "v5"): ("v5", None),
}


def normalize(p: Platform) -> Platform:
    """Fold aliases (x86_64, aarch64, arm64 without variant) into the canonical OCI form."""
    arch, default_variant = _MACHINE_ARCH.get(p.architecture, (p.architecture, None))
    variant = p.variant or default_variant
    if arch == "amd64" and variant == "v1":
        variant = None
    return Platform(p.os.lower(), arch, variant)


def host_platform() -> Platform:
    """The platform images are selected for: $MATCHLOCK_PLATFORM (os/arch[/variant]) or uname."""
    override = os.environ.get("MATCHLOCK_PLATFORM")
    if override:
        return parse_platform(override)
    machine = _platform.machine()
    arch, variant = _MACHINE_ARCH.get(machine, (machine, None))
    return Platform("linux", arch, variant)


def parse_platform(text: str) -> Platform:
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ImageError(
            f"invalid platform {text!r}", hint="use OS/ARCH[/VARIANT], e.g. linux/amd64"
        )
    return normalize(Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None))


def _rank(candidate: Platform | None, want: Platform) -> int | None:
    """0 for the best match, higher for worse; None if the image cannot run on `want`."""
    if candidate is None:
        return None
    have = normalize(candidate)
    if have.os != want.os or have.architecture != want.architecture:
        return None
    accepted = _COMPATIBLE_VARIANTS.get((want.architecture, want.variant), (want.variant,))
    try:
        return accepted.index(have.variant)
    except ValueError:
        return None


def select_manifest(descriptors: Sequence[Descriptor], want: Platform, what: str) -> Descriptor:
    """The entry of an index to use on `want`: the best variant match, then index order.

    Entries that are not images (attestations, signatures: other media types or the
    `unknown/unknown` platform) never match. An index with a single entry that has no
    platform is taken as is; the image config is checked later anyway.
    """
    want = normalize(want)
    images = [d for d in descriptors if d.media_type in INDEX_TYPES | MANIFEST_TYPES]
    ranked = [
        (rank, i, d)
        for i, d in enumerate(images)
        if (rank := _rank(d.platform, want)) is not None
    ]
    if ranked:
        return min(ranked, key=lambda item: (item[0], item[1]))[2]
    unmarked = [d for d in images if d.platform is None]
    if len(unmarked) == 1 and len(images) == 1:
        return unmarked[0]
    offered = sorted({str(normalize(d.platform)) for d in images if d.platform is not None})
    only = f" (it has {', '.join(offered)})" if offered else ""
    raise ImageError(
        f"{what} has no image for {want}{only}",
        hint=f"matchlock runs {want} images; pick an image or tag built for it",
    )


def check_config_platform(os_name: str | None, arch: str | None, variant: str | None,
                          want: Platform, what: str) -> None:
    """Refuse an image whose config says it was built for another platform."""
    if os_name is None and arch is None:
        return  # very old configs omit both; nothing to check
    have = Platform(os_name or want.os, arch or want.architecture, variant)
    if _rank(have, normalize(want)) is None:
        raise ImageError(
            f"{what} is built for {normalize(have)}; matchlock runs {normalize(want)}",
            hint=f"use the {normalize(want)} variant of the image",
        )
