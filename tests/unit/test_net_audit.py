"""Audit events as JSON lines."""

from __future__ import annotations

import io
import json

from matchlock.net.audit import AuditEvent, JsonLinesSink, MemorySink, fan_out, strip_query


def test_json_lines() -> None:
    out = io.StringIO()
    memory = MemorySink()
    sink = fan_out(JsonLinesSink(out), memory)
    sink(
        AuditEvent(
            host="a.test",
            port=443,
            action="allow",
            reason="ok",
            method="GET",
            path="/x",
            status=200,
            bytes_down=5,
            duration_ms=1.23456,
            protocol="https",
        )
    )
    sink(AuditEvent(host="b.test", port=22, action="block", reason="no", protocol="tcp"))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and len(memory.events) == 2
    first = json.loads(lines[0])
    assert first["host"] == "a.test" and first["duration_ms"] == 1.235 and first["status"] == 200
    assert set(first) >= {
        "time",
        "host",
        "port",
        "method",
        "path",
        "status",
        "bytes_up",
        "bytes_down",
        "duration_ms",
        "action",
        "reason",
    }
    assert json.loads(lines[1])["action"] == "block"


def test_summary_and_strip_query() -> None:
    ev = AuditEvent(host="b.test", port=22, action="block", reason="not allowed", protocol="tcp")
    assert ev.summary().startswith("block b.test:22 tcp") and "(not allowed)" in ev.summary()
    assert strip_query("/a/b?token=x#frag") == "/a/b"


def test_long_guest_fields_are_cut_and_control_characters_neutralised() -> None:
    import json as _json

    from matchlock.net.audit import AuditEvent as _Event

    ev = _Event(host="h" * 300, port=80, action="block", reason="r" * 9000,
                method="M" * 8192, path="/\x1b[2J" + "p" * 8192)
    line = ev.to_json()
    assert len(line) < 2000
    data = _json.loads(line)
    assert data["reason"].startswith("r" * 512) and data["reason"].endswith("(+8488 chars)")
    assert "\x1b" not in ev.summary() and "\x1b" not in line
    assert len(ev.summary()) < 2000
