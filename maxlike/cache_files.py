"""maxlike's cache folder and the small files in it: where it is, atomic writes, JSON records.

Every cache (executables, converted weights, HF configs, GGUF conversions,
activation records) lives under one folder and writes through these helpers,
so a crash never leaves a half-written file and an unwritable folder is
reported the same way everywhere: the cache is skipped, with one warning.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from typing import Any


class CacheWriteWarning(UserWarning):
    """A cache file could not be written (read-only or full disk, a file in the way): maxlike runs uncached."""


def cache_root() -> str:
    """maxlike's cache folder: $MAXLIKE_CACHE_DIR, else $XDG_CACHE_HOME/maxlike, else ~/.cache/maxlike."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("MAXLIKE_CACHE_DIR") or os.path.join(base, "maxlike")


def read_json(path: str) -> dict | None:
    """A small JSON file written by `write_json`, or None when missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path: str, value: dict) -> None:
    """Write `value` as JSON atomically (raises OSError when the folder cannot be written)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, json.dumps(jsonable(value), indent=1, sort_keys=True).encode())


def jsonable(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists, other objects their str)."""
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def atomic_write(path: str, data: bytes, mode: int | None = None) -> None:
    """Write to a temporary name in the same folder, then rename into place: readers see the
    old file or the whole new one, never a part. `mode` sets the permission bits."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def warn_unwritable(what: str, path: str, error: BaseException) -> None:
    """The one warning a cache gives when it cannot write (then it stops trying)."""
    warnings.warn(f"{what} at {path} cannot be written ({type(error).__name__}: {error}); running without "
                  "it. Point cache_dir (--cache-dir, $MAXLIKE_CACHE_DIR) at a writable folder to cache.",
                  CacheWriteWarning, stacklevel=3)


def defining_files(*objects: Any) -> list[str]:
    """The Python files defining `objects` (functions, classes, modules), deduplicated, sorted:
    what a cache key hashes so that code registered from outside maxlike changes it too."""
    import inspect

    files = set()
    for obj in objects:
        try:
            path = inspect.getsourcefile(obj if inspect.ismodule(obj) else inspect.unwrap(obj))
        except TypeError:  # builtins, C extensions: nothing to hash
            path = None
        if path:
            files.add(os.path.abspath(path))
    return sorted(files)


def files_hash(paths: list[str]) -> str:
    """A short hash of the names and contents of `paths`."""
    import hashlib

    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read())
    return h.hexdigest()[:16]
