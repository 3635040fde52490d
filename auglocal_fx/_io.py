"""Atomic file writes: a temporary file in the target's folder, flushed, then renamed over it.

A run killed at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from typing import IO, Any, Callable, Union

import torch

__all__ = ["atomic_write", "atomic_save", "atomic_write_text"]


def atomic_write(path: Union[str, os.PathLike], write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(handle)`` on a temporary binary file, then rename it to ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: Union[str, os.PathLike]) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(text: str, path: Union[str, os.PathLike]) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
