"""`matchlock image ...` commands, driven through click's test runner."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from matchlock.cli.image import image
from matchlock.errors import ImageError
from matchlock.image.builtin import write_oci_layout


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MATCHLOCK_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_import_ls_rm_gc(tmp_path: Path) -> None:
    runner = CliRunner()
    layout = tmp_path / "layout"
    digest = write_oci_layout(layout)

    result = runner.invoke(image, ["import", "bb:1", str(layout)])
    assert result.exit_code == 0, result.output
    assert "Imported: bb:1" in result.stdout and f"Digest: {digest}" in result.stdout
    assert "Layers: 1" in result.stdout

    tar = tmp_path / "layout.tar"
    import tarfile

    with tarfile.open(tar, "w") as t:
        for item in sorted(layout.rglob("*")):
            t.add(item, arcname=str(item.relative_to(layout)), recursive=False)
    result = runner.invoke(image, ["import", "bb:2", "-"], input=tar.read_bytes())
    assert result.exit_code == 0, result.output

    result = runner.invoke(image, ["ls"])
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "DIGEST", "SIZE", "CREATED"]
    assert [line.split()[0] for line in lines[1:]] == ["bb:1", "bb:2"]
    assert lines[1].split()[1] == digest.split(":")[1][:12]

    assert runner.invoke(image, ["rm", "bb:1"]).exit_code == 0
    result = runner.invoke(image, ["gc"])
    assert result.exit_code == 0 and result.stdout.startswith("Freed 0.0 MB")
    assert runner.invoke(image, ["rm", "docker.io/library/bb:2"]).exit_code == 0
    result = runner.invoke(image, ["gc"])
    assert result.exit_code == 0 and result.stdout.startswith("Freed 2.")
    assert runner.invoke(image, ["ls"]).stdout.splitlines()[1:] == []


def test_errors_are_matchlock_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(image, ["rm", "nothing"])
    assert isinstance(result.exception, ImageError)
    result = runner.invoke(image, ["import", "x", str(tmp_path / "missing")])
    assert isinstance(result.exception, ImageError)
    result = runner.invoke(image, ["import", "Bad Name", str(tmp_path)])
    assert isinstance(result.exception, ImageError)
