"""User-facing errors: one line that says what failed, why, and what to do."""

from __future__ import annotations


class MatchlockError(Exception):
    """An error the CLI prints as one line (no traceback) and exits non-zero with."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}; {self.hint}"
        return self.message


class SetupMissing(MatchlockError):
    """A host prerequisite (QEMU, kernel, agent) is missing."""


class ImageError(MatchlockError):
    """An image could not be found, read or unpacked."""


class GuestError(MatchlockError):
    """The guest misbehaved: protocol violation, panic, or unexpected exit."""
