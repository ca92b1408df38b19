"""The runtime part of an image config: what to run, with which environment, as whom."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from matchlock.image.oci import malformed, parse_json_object

_WHAT = "image config"


@dataclass(frozen=True)
class ImageConfig:
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""


def _string(value: str, key: str) -> str:
    # NUL cannot be passed through exec() or a path; reject instead of truncating silently.
    if "\x00" in value:
        raise malformed(_WHAT, f"config.{key} contains a NUL character")
    return value


def _string_list(section: dict[str, Any], key: str) -> tuple[str, ...]:
    value = section.get(key)
    if value is None:
        return ()
    # Docker accepts a bare string for Entrypoint/Cmd (its strslice type) and means [value].
    if isinstance(value, str) and key != "Env":
        return (_string(value, key),)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise malformed(_WHAT, f"config.{key} must be a list of strings")
    return tuple(_string(v, key) for v in value)


def _plain_string(section: dict[str, Any], key: str) -> str:
    value = section.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise malformed(_WHAT, f"config.{key} must be a string")
    return _string(value, key)


def image_config_from_json(doc: dict[str, Any]) -> ImageConfig:
    """Build an ImageConfig from a decoded image config document."""
    section = doc.get("config")
    if section is None:
        return ImageConfig()
    if not isinstance(section, dict):
        raise malformed(_WHAT, "'config' must be an object")
    env = _string_list(section, "Env")
    return ImageConfig(
        entrypoint=_string_list(section, "Entrypoint"),
        cmd=_string_list(section, "Cmd"),
        env=env,
        working_dir=_plain_string(section, "WorkingDir"),
        user=_plain_string(section, "User"),
    )


def parse_image_config(raw: bytes) -> ImageConfig:
    """Parse an OCI/Docker image config blob; malformed input raises ImageError."""
    return image_config_from_json(parse_json_object(raw, _WHAT))
