"""One-line, rate-limited warnings for the network plane.

The guest drives how often things fail here (it can open thousands of connections), so a
failure must cost one short line, never a traceback, and never a flood: at most one line per
key and interval, with a count of what was folded into it.
"""

from __future__ import annotations

import logging
import time

_INTERVAL = 1.0
_last: dict[str, tuple[float, int]] = {}


def warn(log: logging.Logger, key: str, message: str, exc: BaseException | None = None) -> None:
    """Log `message` (and `exc` as `Type: text`) unless `key` was logged within a second."""
    now = time.monotonic()
    stamp, folded = _last.get(key, (0.0, 0))
    if now - stamp < _INTERVAL:
        _last[key] = (stamp, folded + 1)
        return
    if len(_last) > 1024:  # keys may carry guest-chosen parts: keep the table bounded
        _last.clear()
    _last[key] = (now, 0)
    text = message if exc is None else f"{message}: {type(exc).__name__}: {exc}"
    if folded:
        text += f" ({folded} more like it in the last second)"
    log.warning("%s", text[:500])
