"""Benchmark runs cached under a key of everything that makes their result.

A key is a JSON-able dict: the benchmark's options, ``code_identity()["source"]`` (the package's
source, so an edit anywhere in ``auglocal_fx/`` trains anew) and ``reference_identity(folder)``
for runs of the authors' code. A run is stored in ``FOLDER/NAME-DIGEST.json`` with its key and
``made_by`` (the commit of the code that made it); its own files (checkpoints) go to
``FOLDER/NAME-DIGEST/``, so a run resumes only its own checkpoints, never those of another key.
Two processes given the same run (two invocations sharing a folder) do not both train it: the
second waits on ``FOLDER/NAME-DIGEST.lock`` and reads the first one's result::

    key = {"seed": 0, "epochs": 5, "code": code_identity()["source"]}
    row = cached_run("bp-seed0", key, Path("runs/acc"), lambda workdir: train_into(workdir))
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, Mapping, Optional

try:
    import fcntl
except ImportError:  # Windows: runs are not guarded against a second process
    fcntl = None

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "auglocal_fx"

__all__ = ["code_identity", "reference_identity", "cached_run", "cached_result_exists"]


def _hash_files(folder: Path, pattern: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob(pattern)):
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def code_identity() -> Dict[str, str]:
    """This checkout's code: ``source`` (a hash of ``auglocal_fx/**/*.py``, for keys) and ``commit``
    (HEAD's short hash, ``+dirty`` when ``auglocal_fx/`` differs from it; ``unknown`` outside git)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        if git("status", "--porcelain", "--", str(PACKAGE)):
            commit += "+dirty"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"source": _hash_files(PACKAGE, "*.py"), "commit": commit}


def reference_identity(folder: Optional[str]) -> Optional[str]:
    """A hash of the ``.py`` files under ``folder`` (the authors' code comes without ``.git``);
    ``None`` without a folder."""
    return None if folder is None else _hash_files(Path(folder), "*.py")


def _paths(name: str, key: Mapping[str, object], folder: Path):
    """``(key as it reads back from disk, result file, work folder)`` of the run ``name``."""
    key = json.loads(json.dumps(dict(key), sort_keys=True))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return key, folder / f"{name}-{digest}.json", folder / f"{name}-{digest}"


def cached_result_exists(name: str, key: Mapping[str, object], folder: Path) -> bool:
    """Whether a run ``name`` with this ``key`` finished in ``folder``."""
    return _paths(name, key, folder)[1].exists()


@contextlib.contextmanager
def _exclusive(lock: Path, name: str) -> Iterator[None]:
    """Hold ``lock`` while a run trains; another process asking for the same run waits here.

    ``flock`` is released by the kernel when its holder dies, so a killed run leaves no lock.
    """
    if fcntl is None:
        yield
        return
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"  {name}: another process is training this run; waiting for it", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_run(name: str, key: Mapping[str, object], folder: Path,
               fn: Callable[[Path], Dict[str, object]], rerun: bool = False) -> Dict[str, object]:
    """The result of the run ``name`` under ``key``: from ``folder`` if a run with this key
    finished there (and not ``rerun``), else ``fn(workdir)``, stored with ``key`` and ``made_by``.

    ``fn`` gets the run's own empty-or-resumable folder (emptied first under ``rerun``) and
    returns the result as a JSON-able dict; an exception in ``fn`` stores nothing. While ``fn``
    runs, the run is locked: another process asking for it waits, then reads the result (or
    trains it, resuming the checkpoints, if the first failed). The result file is written
    whole or not at all.
    """
    key, path, workdir = _paths(name, key, folder)
    if path.exists() and not rerun:
        return json.loads(path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    with _exclusive(workdir.with_name(workdir.name + ".lock"), name):
        if path.exists() and not rerun:  # finished by the process this one waited for
            return json.loads(path.read_text())
        if rerun:
            shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True, exist_ok=True)
        result = {**fn(workdir), "key": key, "made_by": code_identity()["commit"]}
        partial = path.with_name(path.name + ".tmp")
        partial.write_text(json.dumps(result, indent=1))
        os.replace(partial, path)
    return result
