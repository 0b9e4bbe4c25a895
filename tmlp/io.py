"""Atomic file writing: every artifact goes to a temporary name in its destination folder and is renamed when
complete, so that no partial file ever stands under a final name."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator

from tmlp.errors import TmlpError


def ensure_writable_dir(path: str | os.PathLike) -> str:
    """Create ``path`` if needed and check that files can be written in it; returns it as str."""
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise TmlpError(f"cannot create output folder {path!r} ({err.strerror}); choose another --out") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise TmlpError(f"output folder {path!r} is not writable; choose another --out or fix its permissions")
    return path


def check_can_write(path: str | os.PathLike) -> str:
    """Fail early, creating nothing, unless folder ``path`` exists writable or could be created."""
    path = os.path.abspath(os.fspath(path))
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise TmlpError(f"output folder {path!r} cannot be created: {probe!r} is a file; choose another --out")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise TmlpError(f"output folder {path!r} is not writable ({probe!r}); choose another --out")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on any error delete it."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    ensure_writable_dir(folder)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:  # on disk before it takes the final name
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as sorted, indented JSON, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
