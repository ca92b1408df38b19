"""The sandbox CA and the per-sandbox files SETUP writes, as the guest sees them: the same on a
cold boot, in the run that builds an image template and in its clones (which fill in files
the template made for them)."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from matchlock.sandbox.network import Egress, NetworkOptions

from .conftest import MATCHLOCK
from .guest_util import booted
from .layouts import write_layout_with_layer
from .test_stuck_channels import BUNDLE, write_layout_with_bundle

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="a sealed NIC needs root"),
]
Run = Callable[..., subprocess.CompletedProcess[bytes]]
ROOTS_SIZE = 3000  # not a whole number of PEM blocks: the image's bundle lacks a final newline
SHOW = ("for f in /etc/matchlock/ca.pem /etc/matchlock/ca-bundle.pem /" + BUNDLE + " "
        "/etc/pki/tls/certs/ca-bundle.crt /etc/ssl/cert.pem; do "
        "if [ -e $f ]; then echo \"== $f $(stat -c %a:%u $f)\"; cat $f; "
        "else echo \"== $f missing\"; fi; done")


@pytest.fixture(scope="module")
def roots_image(state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    layout = tmp_path_factory.mktemp("roots") / "layout"
    write_layout_with_bundle(layout, ROOTS_SIZE)
    r = subprocess.run([MATCHLOCK, "image", "import", "roots:1", str(layout)],
                       capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()
    yield "roots:1"


def _files(out: bytes) -> dict[str, bytes | None]:
    """SHOW's output: each file's content (None if missing), after checking its mode."""
    files: dict[str, bytes | None] = {}
    for part in out.split(b"== ")[1:]:
        head, _, body = part.partition(b"\n")
        name, state = head.decode().split(" ", 1)
        if state == "missing":
            files[name] = None
        else:
            assert state == "644:0", (name, state)
            files[name] = body
    return files


def _roots() -> bytes:
    pem = (b"-----BEGIN CERTIFICATE-----\n" + b"QUJD" * 16 + b"\n"
           b"-----END CERTIFICATE-----\n")
    return (pem * (ROOTS_SIZE // len(pem) + 1))[:ROOTS_SIZE]


def _check(files: dict[str, bytes | None], roots: bytes | None) -> bytes:
    ca = files["/etc/matchlock/ca.pem"]
    assert ca is not None and ca.startswith(b"-----BEGIN CERTIFICATE-----") and \
        ca.count(b"BEGIN") == 1, ca
    merged = (roots + b"\n" if roots else b"") + ca
    assert files["/etc/matchlock/ca-bundle.pem"] == merged
    assert files["/" + BUNDLE] == merged  # the image's own bundle, or the first place if none
    assert files["/etc/pki/tls/certs/ca-bundle.crt"] is None
    assert files["/etc/ssl/cert.pem"] is None
    return ca


@pytest.mark.parametrize("snapshots", ["1", "0"])
def test_the_ca_is_appended_to_the_images_roots(ml: Run, roots_image: str, snapshots: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATCHLOCK_SNAPSHOTS", snapshots)
    # With snapshots: the first run builds the image template, the next ones are its clones.
    cas = {_check(_files(ml("run", "--image", roots_image, "--", "sh", "-c", SHOW,
                            check=True).stdout), _roots()) for _ in range(3)}
    assert len(cas) == 3  # a CA per sandbox


def test_an_image_without_roots_gets_the_ca_alone(ml: Run) -> None:
    cas = {_check(_files(ml("run", "--", "sh", "-c", SHOW, check=True).stdout), None)
           for _ in range(3)}
    assert len(cas) == 3


def test_without_a_nic_the_images_files_stay_as_they_are(ml: Run, roots_image: str) -> None:
    script = (f"cat /{BUNDLE}; ls /etc/matchlock 2>&1; ls /etc/resolv.conf 2>&1; "
              "cat /etc/hostname; hostname; grep -c . /etc/hosts")
    for _ in range(3):  # template, clones
        r = ml("run", "--no-network", "--image", roots_image, "--", "sh", "-c", script,
               check=True)
        out = r.stdout
        assert out.startswith(_roots()), out[:200]
        rest = out[len(_roots()):].decode().splitlines()
        assert "No such file" in rest[0] and "No such file" in rest[1], rest
        assert rest[2] == rest[3] and rest[2].startswith("vm-"), rest
        assert rest[4] == "3", rest  # localhost, ::1 and the hostname


def test_the_network_setup_of_a_clone(ml: Run) -> None:
    script = "cat /etc/resolv.conf; ip -4 addr show eth0; ip route; ip link show lo"
    outs = [ml("run", "--", "sh", "-c", script, check=True).stdout.decode() for _ in range(3)]
    for out in outs:
        assert "nameserver 10.213.0.1\n" in out
        assert "inet 10.213.0.2/24" in out
        assert "default via 10.213.0.1 dev eth0" in out
        assert "<LOOPBACK,UP," in out


def _symlink_layer() -> bytes:
    """The image's bundle is a symlink into /proc: the agent (root, in its own view of /proc)
    must not take that file for the image's roots."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("etc", "etc/ssl", "etc/ssl/certs"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        info = tarfile.TarInfo(BUNDLE)
        info.type, info.linkname = tarfile.SYMTYPE, "/proc/version"
        tar.addfile(info)
    return gzip.compress(out.getvalue(), mtime=0)


def test_a_bundle_that_links_into_proc_is_not_read(ml: Run,
                                                  tmp_path_factory: pytest.TempPathFactory
                                                  ) -> None:
    layout = tmp_path_factory.mktemp("linkca") / "layout"
    write_layout_with_layer(layout, _symlink_layer())
    r = ml("image", "import", "linkca:1", str(layout), timeout=600)
    assert r.returncode == 0, r.stderr.decode()
    for _ in range(2):  # the template's run, a clone
        files = _files(ml("run", "--image", "linkca:1", "--", "sh", "-c", SHOW,
                          check=True).stdout)
        _check(files, None)  # replaced by a file holding the CA alone, as without roots
        assert b"Linux version" not in (files["/" + BUNDLE] or b"")


class _Egress(Egress):
    """The proxy (and so the CA) ready by SETUP, or late: the CA then follows SETUP."""

    def __init__(self, ready: bool) -> None:
        super().__init__(NetworkOptions())
        self.ready = ready

    def proxy_ready(self) -> bool:
        if self.ready:
            self.ca_pem()  # waits for it
        return self.ready


@pytest.mark.parametrize("ready", [True, False], ids=["in-setup", "late"])
def test_the_ca_in_setup_or_right_behind_it(ml: Run, roots_image: str, ready: bool) -> None:
    ml("run", "--image", roots_image, "--", "true", check=True)  # the image template exists
    egress = _Egress(ready)
    with booted(roots_image, egress) as g:
        assert g.sandbox.restored
        code, out, err = g.sh(SHOW)
        assert code == 0, err
        assert _check(_files(out.encode()), _roots()) == egress.ca_pem()
