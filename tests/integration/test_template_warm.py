"""The image template's warm-up (PREPARE runs `python3 -I -c pass` once before the template is
saved): its effects on the file system are the bytecode Python writes, its processes never
reach a clone, and it can be turned off."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import MATCHLOCK
from .layouts import write_layout_with_layer

pytestmark = pytest.mark.vm
Run = Callable[..., subprocess.CompletedProcess[bytes]]

# A `python3` that records how it was started, leaves a process running and writes a file:
# what a hostile image's warm-up could try.
FAKE_PYTHON = b"""#!/bin/sh
{ echo "args=$*"; echo "uid=$(id -u)"; } > /warm-ran
sleep 600 &
echo $! > /warm-child
"""
ENCODINGS = "/usr/local/lib/python3.12/encodings"


def _layer(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("usr", "usr/bin"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(out.getvalue(), mtime=0)


@pytest.fixture(scope="module")
def fake_python_image(state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    layout = tmp_path_factory.mktemp("warm") / "layout"
    write_layout_with_layer(layout, _layer({"usr/bin/python3": FAKE_PYTHON}))
    r = subprocess.run([MATCHLOCK, "image", "import", "fakepy:1", str(layout)],
                       capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()
    return "fakepy:1"


@pytest.fixture
def no_warm() -> Iterator[None]:
    before = os.environ.get("MATCHLOCK_TEMPLATE_WARM")
    os.environ["MATCHLOCK_TEMPLATE_WARM"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["MATCHLOCK_TEMPLATE_WARM"]
        else:
            os.environ["MATCHLOCK_TEMPLATE_WARM"] = before


def test_the_warm_up_runs_once_as_root_and_none_of_its_processes_reach_a_clone(
        ml: Run, fake_python_image: str) -> None:
    # (PIDs restart in each clone's namespace: look for the process by its command line.)
    script = ("cat /warm-ran; test -s /warm-child || echo no-child; "
              "if ps -o args | grep -q '^sleep 600'; then echo left; fi")
    outs = [ml("run", "--no-network", "--image", fake_python_image, "--", "sh", "-c", script,
               check=True).stdout for _ in range(2)]
    # The first run made the image template (so ran the warm-up), the second restored it: both
    # see what it wrote, neither a process it started.
    assert outs[0] == outs[1] == b"args=-I -c pass\nuid=0\n", outs


def test_python_clones_load_start_up_bytecode_the_template_compiled(
        ml: Run, python_image: str) -> None:
    for _ in range(2):  # the first run saves the image template, the second restores it
        r = ml("run", "--no-network", "--image", python_image, "--", "python3", "-v", "-c",
               "pass", check=True)
    err = r.stderr.decode()
    for mod in ("__init__", "aliases", "utf_8"):
        pyc = f"{ENCODINGS}/__pycache__/{mod}.cpython-312.pyc"
        assert f"# {pyc} matches {ENCODINGS}/{mod}.py" in err, err[-2000:]


def test_without_the_warm_up_a_python_clone_sees_the_image_as_it_is(
        ml: Run, python_image: str, no_warm: None) -> None:
    for _ in range(2):
        r = ml("run", "--no-network", "--image", python_image, "--", "ls", "-A",
               f"{ENCODINGS}/__pycache__", check=True)
    assert r.stdout == b"", r.stdout  # the image ships the directory empty
