"""Plain progress lines (what CI logs and pipes get)."""

from __future__ import annotations

import io

import pytest

from matchlock.image import progress as progress_mod
from matchlock.image.progress import PlainProgress, PullProgress, human_rate, make_progress


def test_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    p = PlainProgress(out)
    p.begin([("sha256:" + "a" * 64, 2_000_000), ("sha256:" + "b" * 64, 500_000)],
            {"sha256:" + "b" * 64})
    monkeypatch.setattr(progress_mod, "_PLAIN_INTERVAL_S", 0.0)
    p.advance("sha256:" + "a" * 64, 1_000_000)
    p.advance("sha256:" + "a" * 64, 1_000_000)
    p.finished("sha256:" + "a" * 64)
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == ("matchlock: 2 layers, 2.5 MB, 1 already present; "
                        "2.0 MB to download")
    assert lines[1].startswith("matchlock: 1.5 MB of 2.5 MB (60%), ")
    assert lines[3] == "matchlock: layer 1/2 aaaaaaaaaaaa 2.0 MB done"
    assert lines[4].startswith("matchlock: downloaded 2.0 MB in ")
    assert p.downloaded == 2_000_000


def test_resume_and_restart_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    p = PullProgress()
    p.begin([("sha256:x", 100)], set())
    p.resumed("sha256:x", 40)
    assert p.totals() == (40, 100)
    p.restarted("sha256:x")
    assert p.totals() == (0, 100)


def test_choice_of_renderer(monkeypatch: pytest.MonkeyPatch) -> None:
    assert type(make_progress(quiet=True)) is PullProgress
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert isinstance(make_progress(), PlainProgress)
    assert human_rate(10_000_000, 2.0) == "5.0 MB/s"
