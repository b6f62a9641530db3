"""Paths as fsspec URLs, and atomic writes.

Every artifact path in miles is an fsspec URL (`/local/dir`, `file://`, `memory://`, `s3://`).
Writes go to a temporary name first and are renamed into place only when complete, so that a crash
never leaves a half-written artifact that a later stage would trust.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator

import fsspec
from fsspec.core import url_to_fs

__all__ = ["atomic_dir", "atomic_write", "filesystem", "join", "is_local"]


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, path-within-it) for an fsspec URL or a plain local path."""
    fs, path = url_to_fs(str(url))
    return fs, path


def is_local(url: str) -> bool:
    fs, _ = filesystem(url)
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with '/', keeping the protocol."""
    out = str(url).rstrip("/")
    for p in parts:
        out = out + "/" + str(p).strip("/")
    return out


def _tmp_name(path: str) -> str:
    head, tail = os.path.split(path.rstrip("/"))
    return os.path.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_write(url: str, mode: str = "wb") -> Iterator:
    """Open `url` for writing under a temporary name; rename into place on success.

    On an exception the temporary file is removed and the destination is left untouched.
    """
    fs, path = filesystem(url)
    tmp = _tmp_name(path)
    parent = os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    try:
        with fs.open(tmp, mode) as f:
            yield f
        if fs.exists(path):
            fs.rm(path)
        fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary local directory that becomes `path` only when the block completes.

    The temporary directory sits beside `path` (same filesystem, so the rename is atomic) and its
    name starts with '.', so no later stage mistakes it for a finished artifact. On an exception
    it is deleted. An existing `path` is replaced only when `overwrite` is set.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        from miles_core.errors import MilesError

        raise MilesError(f"output directory {path} already exists; remove it or pass overwrite")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _tmp_name(path)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.exists(path):
            old = _tmp_name(path)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
