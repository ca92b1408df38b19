"""A sandbox never modifies what sandboxes share: the image store's root filesystems."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable

import pytest

from matchlock.image.builtin import ensure_builtin
from matchlock.image.store import ROOTFS_DEVICE_BYTES, ImageStore

pytestmark = pytest.mark.vm
Run = Callable[..., subprocess.CompletedProcess[bytes]]


def test_rootfs_is_read_only_and_untouched_by_runs(ml: Run) -> None:
    ml("run", "--", "true", check=True)  # builds the built-in image's rootfs if needed
    store = ImageStore()
    path = store.rootfs_path(ensure_builtin(store))
    before = os.stat(path)
    assert stat.S_IMODE(before.st_mode) == 0o444
    assert before.st_size == ROOTFS_DEVICE_BYTES
    r = ml("run", "--", "sh", "-c", "echo x > /etc/x && cat /etc/x")
    assert (r.returncode, r.stdout) == (0, b"x\n"), r.stderr
    after = os.stat(path)
    assert (after.st_mtime_ns, after.st_ctime_ns, after.st_size, after.st_mode) == (
        before.st_mtime_ns, before.st_ctime_ns, before.st_size, before.st_mode)
