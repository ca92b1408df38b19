"""The test session's own MATCHLOCK_HOME (tests/conftest.py) is what matchlock uses."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.conftest import REAL_CACHE, REAL_STATE, _changes, _snapshot

from matchlock import paths


def test_paths_point_into_the_session_home(matchlock_home: Path) -> None:
    assert paths.cache_dir() == matchlock_home / "cache"
    assert paths.state_dir() == matchlock_home
    for real in (REAL_CACHE, REAL_STATE):
        assert not paths.cache_dir().is_relative_to(real)
        assert not paths.state_dir().is_relative_to(real)


def test_matchlock_home_is_the_documented_root(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    monkeypatch.delenv("MATCHLOCK_CACHE_DIR")
    monkeypatch.delenv("MATCHLOCK_STATE_DIR")
    monkeypatch.setenv("MATCHLOCK_HOME", str(tmp_path))
    assert (paths.state_dir(), paths.cache_dir()) == (tmp_path, tmp_path / "cache")


def test_the_guard_sees_writes(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("x")
    before = _snapshot(tmp_path)
    (tmp_path / "b").mkdir()
    (tmp_path / "a").write_text("xy")
    assert _changes(before, _snapshot(tmp_path)) == ["added b", "changed .", "changed a"]
