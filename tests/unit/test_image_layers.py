"""Applying layer tars: OCI changeset semantics, metadata, and refusal of hostile entries."""

from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path

import pytest
from image_testutil import (
    MTIME,
    apply,
    device,
    digest,
    dir_,
    fifo,
    gzipped,
    hardlink,
    reg,
    requires_root,
    symlink,
    tar_bytes,
    zstd,
)

from matchlock.errors import ImageError


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the root that no layer may touch."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "victim").write_text("original")
    return path


def test_files_dirs_and_metadata(root: Path) -> None:
    apply(
        root,
        tar_bytes(
            dir_("./"),
            dir_("etc/", mode=0o750, uid=12, gid=34, mtime=1_000_000_000),
            reg("etc/motd", b"hello\n", mode=0o640, uid=5, gid=6),
            reg("./etc/deep/implicit", b"x"),
        ),
    )
    assert (root / "etc/motd").read_bytes() == b"hello\n"
    st = os.lstat(root / "etc/motd")
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_mtime == MTIME
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (5, 6)
    etc = os.lstat(root / "etc")
    assert stat.S_IMODE(etc.st_mode) == 0o750
    # Children were added after the directory entry; its mtime must still be the tar's.
    assert etc.st_mtime == 1_000_000_000
    assert stat.S_IMODE(os.lstat(root / "etc/deep").st_mode) == 0o755
    assert (root / "etc/deep/implicit").read_bytes() == b"x"


@pytest.mark.parametrize("compress", [lambda b: b, gzipped, zstd], ids=["tar", "gzip", "zstd"])
def test_compression_detected_and_digest_verified(root: Path, compress: object) -> None:
    assert callable(compress)
    blob = compress(tar_bytes(reg("a", b"data")))
    apply(root, blob, digest(blob))
    assert (root / "a").read_bytes() == b"data"


def test_wrong_digest_refused(root: Path) -> None:
    blob = gzipped(tar_bytes(reg("a", b"data")))
    with pytest.raises(ImageError, match="digest"):
        apply(root, blob, digest(b"something else"))


def test_truncated_tampered_blob_reports_digest(root: Path) -> None:
    blob = gzipped(tar_bytes(reg("a", b"data" * 1000)))
    with pytest.raises(ImageError, match="tampered"):
        apply(root, blob[: len(blob) // 2], digest(blob))


def test_garbage_is_not_a_layer(root: Path) -> None:
    with pytest.raises(ImageError, match="not a valid"):
        apply(root, b"this is not a tar archive at all" * 20)


def test_empty_layers(root: Path) -> None:
    apply(root, b"")
    apply(root, gzipped(b""))
    apply(root, tar_bytes())
    assert list(root.iterdir()) == []


def test_whiteout_removes_lower_file_and_dir(root: Path) -> None:
    apply(root, tar_bytes(reg("keep"), reg("gone"), reg("dir/sub/file")))
    apply(root, tar_bytes(reg(".wh.gone"), reg(".wh.dir"), reg(".wh.never-existed")))
    assert sorted(p.name for p in root.iterdir()) == ["keep"]


def test_whiteout_does_not_hide_same_layer_file(root: Path) -> None:
    apply(root, tar_bytes(reg("f", b"new"), reg(".wh.f")))
    assert (root / "f").read_bytes() == b"new"


def test_opaque_dir_hides_lower_content_only(root: Path) -> None:
    apply(root, tar_bytes(reg("d/old"), reg("d/sub/old"), reg("other")))
    apply(
        root,
        tar_bytes(
            dir_("d/"),
            reg("d/before", b"1"),
            dir_("d/sub/"),
            reg("d/.wh..wh..opq"),
            reg("d/after", b"2"),
        ),
    )
    assert sorted(p.name for p in (root / "d").iterdir()) == ["after", "before", "sub"]
    assert list((root / "d/sub").iterdir()) == []
    assert (root / "other").exists()
    assert not (root / "d/.wh..wh..opq").exists()


def test_opaque_keeps_implicit_parents_of_same_layer_entries(root: Path) -> None:
    apply(root, tar_bytes(reg("d/x/lower")))
    apply(root, tar_bytes(reg("d/x/upper"), reg("d/.wh..wh..opq")))
    assert sorted(p.name for p in (root / "d/x").iterdir()) == ["upper"]


def test_hardlinks(root: Path) -> None:
    apply(root, tar_bytes(reg("lower", b"L")))
    apply(root, tar_bytes(reg("a", b"A"), hardlink("b", "a"), hardlink("c", "./lower")))
    assert os.lstat(root / "a").st_ino == os.lstat(root / "b").st_ino
    assert os.lstat(root / "lower").st_ino == os.lstat(root / "c").st_ino


def test_hardlink_to_symlink_links_the_symlink(root: Path, outside: Path) -> None:
    apply(root, tar_bytes(symlink("s", str(outside / "victim")), hardlink("h", "s")))
    assert os.path.islink(root / "h")
    assert os.lstat(root / "h").st_ino == os.lstat(root / "s").st_ino
    assert os.lstat(outside / "victim").st_nlink == 1


def test_symlinks_created_as_is(root: Path) -> None:
    apply(root, tar_bytes(symlink("abs", "/etc/passwd"), symlink("rel", "../../../x")))
    assert os.readlink(root / "abs") == "/etc/passwd"
    assert os.readlink(root / "rel") == "../../../x"


def test_file_replaces_symlink_instead_of_writing_through(root: Path, outside: Path) -> None:
    apply(root, tar_bytes(symlink("link", str(outside / "victim"))))
    apply(root, tar_bytes(reg("link", b"mine")))
    assert (outside / "victim").read_text() == "original"
    assert not os.path.islink(root / "link")
    assert (root / "link").read_bytes() == b"mine"


def test_dir_replaces_symlink_to_outside_dir(root: Path, outside: Path) -> None:
    before = os.lstat(outside)
    apply(root, tar_bytes(symlink("d", str(outside)), dir_("d/", mode=0o700, uid=7)))
    assert not os.path.islink(root / "d") and (root / "d").is_dir()
    after = os.lstat(outside)
    assert (after.st_mode, after.st_uid) == (before.st_mode, before.st_uid)
    assert (outside / "victim").read_text() == "original"


def test_replace_file_with_dir_and_back(root: Path) -> None:
    apply(root, tar_bytes(reg("x", b"file")))
    apply(root, tar_bytes(dir_("x/"), reg("x/inner")))
    assert (root / "x/inner").exists()
    apply(root, tar_bytes(reg("x", b"again")))
    assert (root / "x").read_bytes() == b"again"


@requires_root
def test_devices_fifos_and_special_modes(root: Path) -> None:
    apply(
        root,
        tar_bytes(
            device("dev/null", tarfile.CHRTYPE, 1, 3),
            device("dev/loop9", tarfile.BLKTYPE, 7, 9, mode=0o660),
            fifo("run/pipe", mode=0o620),
            reg("bin/su", b"#!", mode=0o4755, uid=0, gid=0),
            reg("bin/wall", b"#!", mode=0o2755, uid=1000, gid=5),
            reg("bin/owned-suid", b"#!", mode=0o6750, uid=1000, gid=1000),
            dir_("tmp/", mode=0o1777),
        ),
    )
    null = os.lstat(root / "dev/null")
    assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1
    assert os.minor(null.st_rdev) == 3 and stat.S_IMODE(null.st_mode) == 0o666
    loop = os.lstat(root / "dev/loop9")
    assert stat.S_ISBLK(loop.st_mode) and (os.major(loop.st_rdev), os.minor(loop.st_rdev)) == (7, 9)
    pipe = os.lstat(root / "run/pipe")
    assert stat.S_ISFIFO(pipe.st_mode) and stat.S_IMODE(pipe.st_mode) == 0o620
    assert stat.S_IMODE(os.lstat(root / "bin/su").st_mode) == 0o4755
    wall = os.lstat(root / "bin/wall")
    assert stat.S_IMODE(wall.st_mode) == 0o2755 and (wall.st_uid, wall.st_gid) == (1000, 5)
    # chown after chmod would have cleared these bits: the order matters.
    owned = os.lstat(root / "bin/owned-suid")
    assert stat.S_IMODE(owned.st_mode) == 0o6750 and owned.st_uid == 1000
    assert stat.S_IMODE(os.lstat(root / "tmp").st_mode) == 0o1777


def test_xattrs_from_pax_headers(root: Path) -> None:
    probe = root / "probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError:
        pytest.skip("this file system has no user xattrs")
    probe.unlink()
    apply(
        root,
        tar_bytes(reg("f", b"x", xattrs={"user.note": "hi", "trusted.overlay.opaque": "y"})),
    )
    assert os.getxattr(root / "f", "user.note") == b"hi"
    assert "trusted.overlay.opaque" not in os.listxattr(root / "f")


# -- hostile layers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../escape", "a/../../escape", "./../escape", "a/b/../../../escape"]
)
def test_dotdot_traversal_refused(root: Path, outside: Path, name: str) -> None:
    with pytest.raises(ImageError, match=r"'\.\.'"):
        apply(root, tar_bytes(reg(name, b"evil")))
    assert not (root.parent / "escape").exists()


def test_absolute_path_refused(root: Path, outside: Path) -> None:
    with pytest.raises(ImageError, match="absolute"):
        apply(root, tar_bytes(reg(str(outside / "victim"), b"evil")))
    assert (outside / "victim").read_text() == "original"


def test_file_through_escaping_symlink_refused(root: Path, outside: Path) -> None:
    with pytest.raises(ImageError, match="symlink"):
        apply(root, tar_bytes(symlink("evil", str(outside)), reg("evil/victim", b"evil")))
    assert (outside / "victim").read_text() == "original"
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]


def test_relative_escaping_symlink_then_file_refused(root: Path, outside: Path) -> None:
    with pytest.raises(ImageError, match="symlink"):
        apply(root, tar_bytes(symlink("evil", "../outside"), reg("evil/new", b"evil")))
    assert not (outside / "new").exists()


def test_symlink_planted_in_lower_layer_refused(root: Path, outside: Path) -> None:
    apply(root, tar_bytes(symlink("etc", str(outside))))
    with pytest.raises(ImageError, match="symlink"):
        apply(root, tar_bytes(reg("etc/victim", b"evil")))
    with pytest.raises(ImageError, match="symlink"):
        apply(root, tar_bytes(reg("etc/.wh.victim")))
    assert (outside / "victim").read_text() == "original"


def test_opaque_marker_through_symlink_refused(root: Path, outside: Path) -> None:
    apply(root, tar_bytes(symlink("d", str(outside))))
    with pytest.raises(ImageError, match="symlink"):
        apply(root, tar_bytes(reg("d/.wh..wh..opq")))
    assert (outside / "victim").exists()


@pytest.mark.parametrize("target", ["../outside/victim", "a/../../outside/victim"])
def test_escaping_hardlink_refused(root: Path, outside: Path, target: str) -> None:
    with pytest.raises(ImageError, match=r"'\.\.'"):
        apply(root, tar_bytes(hardlink("stolen", target)))
    assert not (root / "stolen").exists()
    assert os.lstat(outside / "victim").st_nlink == 1


def test_absolute_hardlink_refused(root: Path, outside: Path) -> None:
    with pytest.raises(ImageError, match="absolute"):
        apply(root, tar_bytes(hardlink("stolen", str(outside / "victim"))))
    assert os.lstat(outside / "victim").st_nlink == 1


def test_hardlink_through_symlink_refused(root: Path, outside: Path) -> None:
    with pytest.raises(ImageError, match="symlink"):
        apply(root, tar_bytes(symlink("s", str(outside)), hardlink("stolen", "s/victim")))
    assert os.lstat(outside / "victim").st_nlink == 1


def test_hardlink_to_missing_target_refused(root: Path) -> None:
    with pytest.raises(ImageError, match="does not exist"):
        apply(root, tar_bytes(hardlink("h", "nowhere")))


def test_hostile_layer_error_is_one_actionable_line(root: Path) -> None:
    with pytest.raises(ImageError) as info:
        apply(root, tar_bytes(reg("../x")))
    text = str(info.value)
    assert "\n" not in text and "refusing layer" in text and "do not use it" in text


@pytest.mark.parametrize(
    "pax",
    [{"mtime": "inf"}, {"mtime": "nan"}, {"mtime": "-1e300"}, {"uid": str(2**40)}],
)
def test_hostile_pax_numbers(root: Path, pax: dict[str, str]) -> None:
    info, data = reg("f", b"x")
    info.pax_headers = pax
    try:
        apply(root, tar_bytes((info, data)))
    except ImageError as exc:
        assert "owner" in str(exc)
    else:
        assert os.lstat(root / "f").st_mtime >= 0


def test_nul_in_pax_path_is_an_image_error(root: Path) -> None:
    info, data = reg("f", b"x")
    info.pax_headers = {"path": "a\x00b"}
    with pytest.raises(ImageError):
        apply(root, tar_bytes((info, data)))


# The extractor keeps parent directories open between entries; a directory replaced later in
# the same layer must never be written through its old fd, nor through a symlink in its place.


def test_cached_dir_replaced_by_symlink_then_written_refused(root: Path, outside: Path) -> None:
    layer = tar_bytes(dir_("a"), dir_("a/b"), reg("a/b/one", b"1"),
                      symlink("a", str(outside)), reg("a/b/victim", b"evil"))
    with pytest.raises(ImageError, match="symlink"):
        apply(root, layer)
    assert (outside / "victim").read_text() == "original"
    assert os.path.islink(root / "a")


def test_cached_dir_replaced_by_file_then_dir_again(root: Path) -> None:
    apply(root, tar_bytes(dir_("a"), dir_("a/b"), reg("a/b/one", b"1"), reg("a", b"file"),
                          dir_("a"), reg("a/b/two", b"2")))
    assert sorted(os.listdir(root / "a")) == ["b"] and os.listdir(root / "a" / "b") == ["two"]


def test_cached_dir_removed_by_whiteout_is_recreated(root: Path) -> None:
    apply(root, tar_bytes(dir_("x"), dir_("x/y"), reg("x/y/old", b"o")))
    apply(root, tar_bytes(reg("x/y/keep", b"k"), reg("x/.wh.y"), reg("x/y/new", b"n")))
    # "x/y" was open (for "keep") when the whiteout removed it: "new" must land in the
    # directory that is at x/y now, not in the removed one.
    listing = os.listdir(root / "x" / "y")
    assert "new" in listing and "old" not in listing


def test_many_directories_exceed_the_cache(root: Path) -> None:
    entries = [reg(f"d{i}/sub/f", str(i).encode()) for i in range(200)]
    entries += [reg(f"d{i}/sub/g", b"again") for i in range(200)]
    apply(root, tar_bytes(*entries))
    assert (root / "d199" / "sub" / "f").read_bytes() == b"199"
    assert (root / "d0" / "sub" / "g").read_bytes() == b"again"
