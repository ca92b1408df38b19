"""Parsing the runtime part of image configs, including hostile ones."""

from __future__ import annotations

import json

import pytest

from matchlock.errors import ImageError
from matchlock.image.config import ImageConfig, parse_image_config


def _raw(config: object) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux", "config": config}).encode()


def test_full_config() -> None:
    cfg = parse_image_config(
        _raw(
            {
                "Entrypoint": ["/entry", "-x"],
                "Cmd": ["python3"],
                "Env": ["PATH=/usr/bin", "LANG=C.UTF-8"],
                "WorkingDir": "/app",
                "User": "appuser",
                "ExposedPorts": {"80/tcp": {}},
            }
        )
    )
    assert cfg == ImageConfig(
        entrypoint=("/entry", "-x"),
        cmd=("python3",),
        env=("PATH=/usr/bin", "LANG=C.UTF-8"),
        working_dir="/app",
        user="appuser",
    )


@pytest.mark.parametrize("config", [None, {}, {"Cmd": None, "Entrypoint": None, "Env": None}])
def test_everything_optional(config: object) -> None:
    assert parse_image_config(_raw(config)) == ImageConfig()


def test_no_config_section() -> None:
    assert parse_image_config(b'{"os": "linux"}') == ImageConfig()


def test_string_entrypoint_is_one_word() -> None:
    # Docker's strslice accepts a plain string for Entrypoint/Cmd.
    cfg = parse_image_config(_raw({"Entrypoint": "/bin/sh", "Cmd": "-c"}))
    assert (cfg.entrypoint, cfg.cmd) == (("/bin/sh",), ("-c",))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        b'"config"',
        _raw([]),
        _raw("sh"),
        _raw({"Cmd": [1, 2]}),
        _raw({"Cmd": {"a": 1}}),
        _raw({"Entrypoint": [["nested"]]}),
        _raw({"Env": "PATH=/bin"}),
        _raw({"Env": [None]}),
        _raw({"WorkingDir": 5}),
        _raw({"User": ["root"]}),
        _raw({"User": True}),
        _raw({"Cmd": ["a\u0000b"]}),
        b"[" * 100_000 + b"]" * 100_000,
        b'{"config": ' * 50_000 + b"{}" + b"}" * 50_000,
    ],
)
def test_hostile_configs_raise_image_error(raw: bytes) -> None:
    with pytest.raises(ImageError, match="image config is malformed"):
        parse_image_config(raw)
