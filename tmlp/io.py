"""Atomic file writing: every artifact goes to a temporary name in its destination folder and is renamed when
complete, so that no partial file ever stands under a final name."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from typing import Any, Iterator

from tmlp.errors import TmlpError

__all__ = ["atomic_path", "cache_path", "cache_root", "check_can_write", "data_root", "ensure_writable_dir",
           "check_file_target", "file_sha256", "folder_kept_on_success", "publish", "save_torch", "signals_deferred", "staging_folder", "write_json", "write_text"]


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


def check_can_write(path: str | os.PathLike, flag: str = "--out") -> str:
    """Fail early, creating nothing, unless folder ``path`` exists writable or could be created."""
    path = os.path.abspath(os.fspath(path))
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise TmlpError(f"output folder {path!r} cannot be created: {probe!r} is a file; choose another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise TmlpError(f"output folder {path!r} is not writable ({probe!r}); choose another {flag}")
    return path


def check_file_target(path: str, flag: str) -> str:
    """Fail early, creating nothing, unless a file could be written at ``path`` (named by option ``flag``)."""
    if not path or os.path.isdir(path):
        raise TmlpError(f"{flag} {path!r} is {'a folder' if path else 'empty'}; pass a file name")
    check_can_write(os.path.dirname(os.path.abspath(path)), flag)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on any error delete it."""
    path = os.fspath(path)
    if not path or os.path.isdir(path):
        raise TmlpError(f"cannot write a file at {path!r}: it is {'a folder' if path else 'an empty path'}; pass a "
                        "file name")
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


@contextlib.contextmanager
def staging_folder(out_dir: str | os.PathLike) -> Iterator[str]:
    """A temporary folder beside ``out_dir`` (hidden, in the same file system) that a run writes its files into
    before ``publish`` moves them under their final names; removed on exit, whatever happened, with the folders
    above ``out_dir`` that it had to create when nothing was published."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    missing = []
    probe = os.path.dirname(out_dir)
    while not os.path.exists(probe):
        missing.append(probe)
        probe = os.path.dirname(probe)
    parent = ensure_writable_dir(os.path.dirname(out_dir))
    path = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.staging-", dir=parent)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(out_dir):
            for folder in missing:  # deepest first
                with contextlib.suppress(OSError):
                    os.rmdir(folder)


@contextlib.contextmanager
def folder_kept_on_success(path: str | os.PathLike, flag: str = "--out") -> Iterator[str]:
    """Create folder ``path`` (and missing parents) for a job that writes into it as it goes (a training run); if the
    job fails or is interrupted before writing anything, remove the folders this created, so that a bad option
    never leaves an empty folder behind. Folders that hold files (a resumable checkpoint) stay."""
    path = os.path.abspath(os.fspath(path))
    check_can_write(path, flag)
    missing = []
    probe = path
    while not os.path.exists(probe):
        missing.append(probe)
        probe = os.path.dirname(probe)
    ensure_writable_dir(path)
    try:
        yield path
    except BaseException:
        for folder in missing:  # deepest first; rmdir refuses a folder that is not empty
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise


@contextlib.contextmanager
def signals_deferred(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while a few renames move a finished run into place, so that the run folder
    holds either the earlier export or this one, whole; a signal that arrived meanwhile is delivered on exit."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def publish(staging: str, out_dir: str | os.PathLike, names: list[str]) -> dict[str, str]:
    """Move files ``names`` from ``staging`` into ``out_dir`` (created if needed); returns {name: final path}."""
    out_dir = ensure_writable_dir(out_dir)
    moved = {}
    for name in names:
        moved[name] = os.path.join(out_dir, name)
        os.replace(os.path.join(staging, name), moved[name])
    return moved


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically and reproducibly: through a file object, so that the zip records inside are not
    named after the random temporary file (the same object gives the same bytes, hence the same sha256)."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f, signals_deferred():
        torch.save(obj, f)  # a Ctrl-C inside torch's zip writer would surface as its RuntimeError: held back


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as sorted, indented JSON, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_root() -> str:
    """Where data sets are downloaded: $TMLP_DATA, else ~/.cache/tmlp/data."""
    return os.environ.get("TMLP_DATA", os.path.join(os.path.expanduser("~"), ".cache", "tmlp", "data"))


def cache_root() -> str:
    """Where tmlp caches trained defaults, calibrations and tools: $TMLP_CACHE, else ~/.cache/tmlp."""
    return os.environ.get("TMLP_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tmlp"))


def cache_path(*parts: str) -> str:
    """A path inside the cache: ``cache_path("calibration", "calib-<hash>.pt")``."""
    return os.path.join(cache_root(), *parts)
