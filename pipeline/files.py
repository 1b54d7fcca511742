"""Small file helpers shared by every stage: atomic writes, hashes, the git commit.

Every output goes through `atomic_path`: written to a temp file beside the target, then renamed,
so a crash never leaves a half-written checkpoint, ONNX file or JSON that a later stage trusts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; on success rename it over `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit(cwd: str | Path = ".") -> str:
    """The current git commit (with '-dirty' when the tree has changes), or 'unknown'."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def load_tensors(path: str | Path, what: str, hint: str = ""):
    """`torch.load(path, weights_only=True)` on the CPU; a file it refuses (truncated, corrupt,
    pickled objects) is a DataError naming `path`, why, and `hint` (what to do), in one line."""
    import warnings

    import torch

    from pipeline.errors import DataError

    try:
        with warnings.catch_warnings():  # a foreign pickle protocol warns before failing
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip, pickle, EOF and weights-only errors, each with a long text
        hint = f"; {hint}" if hint else ""
        raise DataError(f"{path}: not a readable {what} ({_load_failure(err)}){hint}") from None


def _load_failure(err: Exception) -> str:
    """Why `torch.load(weights_only=True)` refused a file, in a few words."""
    text = " ".join(str(err).split())
    unsupported = text.split("Unsupported global: ", 1)
    if len(unsupported) == 2:
        what = unsupported[1].split(" ", 2)[:2]
        return (
            f"it holds pickled Python objects ({' '.join(what)}), which are never loaded: "
            f"only tensors and plain data are"
        )
    if isinstance(err, EOFError) or "central directory" in text or "zip archive" in text:
        return "truncated or empty file"
    detail = text.rsplit("WeightsUnpickler error:", 1)[-1].split(" Check the documentation")[0]
    detail = detail.strip()[:120]
    return f"corrupt file: {detail or type(err).__name__}"
