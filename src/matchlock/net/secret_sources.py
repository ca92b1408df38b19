"""Secrets whose value is read from a file: `--secret-file NAME=PATH@host[,host…]`.

`--secret NAME=VALUE@host` puts the value in the host's process list and in shell history;
`--secret NAME@host` keeps it in the environment. A file keeps it out of both: the owning
process reads it once, and from then on the value lives only in that process's memory, like
any other secret (the guest sees a placeholder).

The value is the file's content with one trailing line ending (`\\n` or `\\r\\n`) removed. It
must be one line of UTF-8 text: the proxy writes it into header lines, where a line break
would forge headers. The file's permissions are not checked; they are the protection of the
value at rest, as for any credentials file.

Error messages name the secret, never the value, and not the path either: a value given by
mistake where the path belongs (`--secret-file NAME=VALUE@host`) must not be echoed.
"""

from __future__ import annotations

import os
import re
import stat

from matchlock.net.secrets import Secret, make_secret

MAX_SECRET_FILE = 64 * 1024
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_USAGE = "expected --secret-file NAME=PATH@host[,host…]"


def parse_secret_file(spec: str) -> Secret:
    """Parse one `--secret-file` value and read its file. Split at the LAST `@` (host names
    have none; a path may)."""
    left, at, hosts_text = spec.rpartition("@")
    if not at:
        raise ValueError(f"--secret-file: {_USAGE}")
    name, eq, path = left.partition("=")
    if not _NAME.match(name):
        raise ValueError(f"--secret-file: the part before '=' is not a variable name; {_USAGE}")
    if not eq or not path:
        raise ValueError(f"--secret-file {name}: no file path before '@'; {_USAGE}")
    hosts = [h.strip() for h in hosts_text.split(",") if h.strip()]
    if not hosts:
        raise ValueError(f"--secret-file {name}: no host after '@'; {_USAGE}")
    return make_secret(name, read_secret_file(name, path), hosts)


def read_secret_file(name: str, path: str) -> str:
    """The value of secret `name` stored in `path`; ValueError (naming `name`) when unusable."""
    where = f"--secret-file {name}"
    try:
        # O_NONBLOCK: a FIFO must not hang the opener; it is refused below as not regular.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise ValueError(f"{where}: cannot open the file: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{where}: not a regular file")
        if st.st_size > MAX_SECRET_FILE:
            raise ValueError(f"{where}: the file is larger than {MAX_SECRET_FILE // 1024} KiB")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_SECRET_FILE:
            chunk = os.read(fd, MAX_SECRET_FILE + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise ValueError(f"{where}: cannot read the file: {e.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_SECRET_FILE:  # grew while being read
        raise ValueError(f"{where}: the file is larger than {MAX_SECRET_FILE // 1024} KiB")
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise ValueError(f"{where}: the file is empty")
    if any(b in data for b in (b"\r", b"\n", b"\0")):
        raise ValueError(f"{where}: the value must be one line (a line break or NUL is in it)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{where}: the file is not UTF-8 text") from None
