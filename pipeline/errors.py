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


def _parse_stage_argv(func, argv: list[str] | None) -> None:
    """A stage takes no arguments (hyperparameters live in params.yaml): `--help` prints the
    stage module's docstring and exits 0 before any work; anything else exits 2."""
    import argparse

    module = sys.modules[func.__module__]
    spec = getattr(module, "__spec__", None)  # `python -m pipeline.x`: __module__ is __main__
    stage = (spec.name if spec else func.__module__).rsplit(".", 1)[-1]
    doc = module.__doc__ or ""
    parser = argparse.ArgumentParser(
        prog=f"pipeline {stage}",
        description=doc,
        epilog="Hyperparameters are never flags: edit params.yaml or `dvc exp run -S key=value`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(sys.argv[1:] if argv is None else argv)


def cli_entry(func):
    """Decorator for command `main()` functions: user errors -> one line + exit 2, a failed
    stage -> one line + exit 1."""
    return _entry(func, parse_args=False)


def stage_entry(func):
    """`cli_entry` for a stage's `main(argv)` (prepare / train / search / compress / export):
    the arguments are checked first, so `--help` exits 0 without running the stage."""
    return _entry(func, parse_args=True)


def _entry(func, parse_args: bool):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if parse_args:
            _parse_stage_argv(func, kwargs.get("argv", args[0] if args else None))
        try:
            return func(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except StageFailed as err:
            print(f"failed: {err}", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper
