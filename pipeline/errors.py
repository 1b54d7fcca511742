"""Errors a user can fix, and the one place that turns them into exit code 2.

`UserError` (and its subclasses `ConfigError`, `DataError`) carry a one-line message that names
what is wrong: the key path or the file, the value, and what is allowed. `cli_entry` wraps a
stage's `main()` so such an error prints `error: <message>` on stderr and exits 2, with no
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Bad input the user can fix; exit code 2."""


class ConfigError(UserError):
    """An invalid params.yaml key or value."""


class DataError(UserError):
    """A dataset that cannot be found, read or downloaded."""


class StageFailed(Exception):
    """A stage ran but its result is not acceptable (diverged, guard failed); exit code 1."""


def cli_entry(func):
    """Decorator for stage `main()` functions: user errors -> one line + exit 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except StageFailed as err:
            print(f"failed: {err}", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper
