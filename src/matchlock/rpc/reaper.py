"""Removes what an rpc process left when it was killed with SIGKILL.

`matchlock rpc` starts this (in a session of its own, stdout and stderr to /dev/null, so it
holds nothing the SDK waits on) with the read end of a pipe whose only writer is the rpc
process. EOF means that process is gone, however it ended. A clean exit removed its sandbox
already (or left it `stopped` for `matchlock rm`); after a SIGKILL the sandbox is `crashed`:
its VMM is killed if it still runs and its directory removed, as `matchlock gc` would.

Usage: python -m matchlock.rpc.reaper OWNER_PID OWNER_START
"""

from __future__ import annotations

import os
import sys
import time


def reap(pid: int, start: int | None) -> list[str]:
    from matchlock.state import registry

    # The owner closed the pipe when it died; /proc may show it a moment longer (zombie).
    deadline = time.monotonic() + 5.0
    while registry.alive(pid, start) and time.monotonic() < deadline:
        time.sleep(0.02)
    removed = []
    for entry in registry.entries():
        owner = entry.owner
        if owner.pid == pid and owner.pid_start == start and entry.status == "crashed":
            registry.collect(entry.path, owner)
            removed.append(owner.id)
    if removed:
        from matchlock.vm import confine

        if confine.enabled():
            confine.remove_stale_ids()
    return removed


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    pid = int(argv[0])
    start = None if argv[1] == "None" else int(argv[1])
    while True:
        try:
            if not os.read(0, 4096):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    reap(pid, start)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
