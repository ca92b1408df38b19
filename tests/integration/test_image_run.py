"""Images imported by the user boot: a `docker save` tarball through stdin, an OCI layout tar."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from matchlock.image.builtin import write_oci_layout

pytestmark = pytest.mark.vm
Run = Callable[..., subprocess.CompletedProcess[bytes]]


def test_docker_save_tarball_from_stdin_runs(ml: Run, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_oci_layout(layout, ref_name="busy")
    archive = tmp_path / "saved.tar"
    subprocess.run(["skopeo", "copy", "-q", f"oci:{layout}:busy",
                    f"docker-archive:{archive}:mine/busy:1"], check=True, capture_output=True)
    r = ml("image", "import", "mine/busy:1", "-", input=archive.read_bytes())
    assert r.returncode == 0, r.stderr
    r = ml("run", "--image", "mine/busy:1", "--", "sh", "-c", "echo $((6*7))")
    assert (r.returncode, r.stdout) == (0, b"42\n"), r.stderr
    r = ml("image", "ls")
    assert b"mine/busy:1" in r.stdout


def test_oci_layout_tar_imports_and_runs(ml: Run, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_oci_layout(layout)
    tar = tmp_path / "layout.tar"
    subprocess.run(["tar", "-C", str(layout), "-cf", str(tar), "."], check=True)
    r = ml("image", "import", "oci-tar:test", str(tar))
    assert r.returncode == 0, r.stderr
    r = ml("run", "--image", "oci-tar:test", "--", "cat", "/etc/passwd")
    assert r.returncode == 0 and b"root:x:0:0" in r.stdout, r.stderr


def test_corrupt_import_is_refused_in_one_line(ml: Run, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not an image archive" * 100)
    r = ml("image", "import", "bad:1", str(bad))
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith(b"matchlock:")]
    assert len(errors) == 1 and b"not a readable tar file" in errors[0]
    assert b"Traceback" not in r.stderr
