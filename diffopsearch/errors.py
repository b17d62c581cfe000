"""User-facing errors: one clear paragraph, exit code 2, no traceback."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a value, a path, a file). The CLI prints it and exits with 2."""

    exit_code = 2


class UnwritableError(UserError, OSError):
    """A file or directory the tool must write cannot be written (still an ``OSError`` for callers
    that catch those)."""


class NumericalError(UserError):
    """A NaN or inf in the search (loss, gradients or architecture state): the message names the
    step and the fix."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C inside a long loop. ``where`` says how far it got ("at step 37 of 120 (last checkpoint:
    step 25)"); the CLI adds how to continue and exits with 130."""

    exit_code = 130

    def __init__(self, where: str):
        super().__init__(where)
        self.where = where


def fail(what: str, value, allowed: str) -> UserError:
    """Build the standard message: which value was bad and what is allowed."""
    return UserError(f"{what} {value!r} is not valid: {allowed}")
