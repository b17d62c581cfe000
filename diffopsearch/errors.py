"""User-facing errors: one clear paragraph, exit code 2, no traceback."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a value, a path, a file). The CLI prints it and exits with 2."""

    exit_code = 2


def fail(what: str, value, allowed: str) -> UserError:
    """Build the standard message: which value was bad and what is allowed."""
    return UserError(f"{what} {value!r} is not valid: {allowed}")
