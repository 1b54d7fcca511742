"""Errors a user can fix, and the one place that turns them into exit code 2.

`UserError` (and its subclasses `ConfigError`, `DataError`) carry a one-line message that names
what is wrong: the key path or the file, the value, and what is allowed. `cli_entry` wraps a
command's `main()` so such an error prints `error: <message>` on stderr and exits 2, a
`StageFailed` prints `failed: <message>` and exits 1, and anything else (a bug) prints
`internal error: <type>: <message>` with the path of a log file holding the traceback and exits
1. None prints a traceback unless `PIPELINE_TRACEBACK=1` is set.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path


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
    stage = _command_name(func)
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
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        except Exception as err:
            if os.environ.get("PIPELINE_TRACEBACK") == "1":
                raise
            log = write_error_log(_command_name(func), err)
            print(f"internal error: {one_line(err)} (traceback in {log})", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper


def one_line(err: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line (whitespace collapsed), at most `limit` characters."""
    text = " ".join(str(err).split())
    line = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _command_name(func) -> str:
    module = sys.modules.get(func.__module__)
    spec = getattr(module, "__spec__", None)  # `python -m pipeline.x`: __module__ is __main__
    return (spec.name if spec else func.__module__).rsplit(".", 1)[-1]


def write_error_log(name: str, err: BaseException) -> Path:
    """Write `err`'s traceback to `logs/pipeline-<name>.log` in a project (a folder with
    params.yaml), else to the temp folder; returns the path (the last failure of each command is
    kept)."""
    text = (
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} pipeline {name} {' '.join(sys.argv[1:])}\n"
        f"cwd: {Path.cwd()}\n\n" + "".join(traceback.format_exception(err))
    )
    folders = [Path(tempfile.gettempdir())]
    if Path("params.yaml").is_file():
        folders.insert(0, Path("logs"))
    for folder in folders:
        path = folder / f"pipeline-{name}.log"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return path.resolve()
        except OSError:
            continue
    return Path(os.devnull)
