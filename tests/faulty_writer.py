"""A guest program for output tests: pages of a known pattern, each written alone, with writes
from a bad address (EFAULT) between them. A faulting pipe write leaves an empty buffer in the
pipe, which the agent's zero-copy output path must never hand to the port (see agent.c)."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

# argv: pages, every (a bad write after every `every` pages). Prints nothing else; exits 0 if
# every good write was whole and every bad one failed with EFAULT.
SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv)
{
    if (argc != 3) return 3;
    long pages = atol(argv[1]), every = atol(argv[2]);
    static uint8_t page[4096];
    for (long i = 0; i < pages; i++) {
        memset(page, (int)(i & 0xff), sizeof page);
        memcpy(page, &i, sizeof i);
        if (write(1, page, sizeof page) != (ssize_t)sizeof page) return 1;
        if (i % every == every - 1 && (write(1, (void *)16, 4096) != -1 || errno != EFAULT))
            return 2;
    }
    return 0;
}
"""


def build_faulty_writer(d: Path) -> Path:
    """A static (musl) binary, so it runs in any guest image."""
    (d / "w.c").write_text(SOURCE)
    subprocess.run(["musl-gcc", "-static", "-O1", "-o", str(d / "w"), str(d / "w.c")],
                   check=True)
    return d / "w"


def faulty_writer_output(pages: int) -> bytes:
    """What the program writes: page i is i (8 bytes, little-endian) then i & 0xff."""
    return b"".join(struct.pack("<q", i) + bytes([i & 0xFF]) * 4088 for i in range(pages))
