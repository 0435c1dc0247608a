"""The ahead-of-time executable cache: compiled programs serialized to disk.

An entry is keyed by everything that changes the program: the executable's name
and input signature, the model's fingerprint (config, dtype, KV layout, bucket
limits), the mesh (shape, device kinds, backend), jax and jaxlib versions and
a hash of maxlike's own source. Each entry is `<key>.exe` (a checked header and
the pickled `serialize_executable` payload) beside `<key>.json`, a readable
record of the key's parts, the size and the compile time. A corrupt, truncated
or mismatched entry is reported with a warning and recompiled; writes go to a
temporary name and are renamed into place, so concurrent writers never leave a
half-written entry.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import struct
import tempfile
import warnings
from typing import Any

import jax

MAGIC = b"MAXLIKE-EXE-1\n"
_HEADER = struct.Struct("<Q32s")  # payload length, sha256 of the payload


class CacheEntryWarning(UserWarning):
    """A cache entry could not be used; the executable is compiled instead."""


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """A hash of maxlike's and graphs' Python source: a code change misses every entry."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    h = hashlib.sha256()
    for package in ("maxlike", "graphs"):
        for folder, _, files in sorted(os.walk(os.path.join(root, package))):
            for name in sorted(f for f in files if f.endswith(".py")):
                with open(os.path.join(folder, name), "rb") as f:
                    h.update(name.encode() + f.read())
    return h.hexdigest()[:16]


def versions() -> dict[str, str]:
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__}


class ExecutableCache:
    """Serialized executables in `folder` (created on first write)."""

    def __init__(self, folder: str):
        self.folder = folder

    def _paths(self, digest: str) -> tuple[str, str]:
        return os.path.join(self.folder, digest + ".exe"), os.path.join(self.folder, digest + ".json")

    @staticmethod
    def digest(parts: dict[str, Any]) -> str:
        return hashlib.sha256(repr(sorted(parts.items())).encode()).hexdigest()[:40]

    def load(self, parts: dict[str, Any], devices=None):
        """The compiled executable stored for `parts`, loaded onto `devices` (the mesh's, in its
        order: by default jax would pick every local device), or None (missing, or unusable: warned)."""
        digest = self.digest(parts)
        try:
            loaded = self.load_digest(digest, devices)
            if loaded is not None and loaded[0] != jsonable(parts):
                raise ValueError("its record names other key parts")
        except Exception as e:  # noqa: BLE001 - any failure means: compile instead
            warnings.warn(f"executable cache entry {self._paths(digest)[0]} is unusable ({e}); recompiling it.",
                          CacheEntryWarning, stacklevel=3)
            return None
        return None if loaded is None else loaded[1]

    def load_digest(self, digest: str, devices=None):
        """(the key parts its record names, the executable) of one entry, None when absent;
        raises when the entry is damaged."""
        exe_path, json_path = self._paths(digest)
        if not os.path.exists(exe_path):
            return None
        with open(exe_path, "rb") as f:
            blob = f.read()
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + _HEADER.size:
            raise ValueError("not a maxlike executable (bad header)")
        size, checksum = _HEADER.unpack_from(blob, len(MAGIC))
        payload = blob[len(MAGIC) + _HEADER.size:]
        if len(payload) != size:
            raise ValueError(f"truncated: {len(payload)} of {size} bytes")
        if hashlib.sha256(payload).digest() != checksum:
            raise ValueError("checksum mismatch")
        with open(json_path) as f:
            record = json.load(f)
        serialized, in_tree, out_tree = pickle.loads(payload)
        from jax.experimental.serialize_executable import deserialize_and_load

        return record.get("key"), deserialize_and_load(serialized, in_tree, out_tree, execution_devices=devices)

    def store(self, parts: dict[str, Any], compiled, compile_seconds: float, notes: dict | None = None) -> int:
        """Write one entry atomically; returns its size in bytes (0 if it could not be serialized).
        `notes` go into the record only (not the key): the target, XLA's memory analysis."""
        from jax.experimental.serialize_executable import serialize

        try:
            payload = pickle.dumps(serialize(compiled))
        except Exception as e:  # noqa: BLE001 - some backends cannot serialize; run uncached
            warnings.warn(f"could not serialize executable {parts.get('name')!r} ({e}); not cached.",
                          CacheEntryWarning, stacklevel=3)
            return 0
        os.makedirs(self.folder, exist_ok=True)
        exe_path, json_path = self._paths(self.digest(parts))
        blob = MAGIC + _HEADER.pack(len(payload), hashlib.sha256(payload).digest()) + payload
        record = {"key": jsonable(parts), "bytes": len(blob), "compile_seconds": round(compile_seconds, 3),
                  **jsonable(notes or {})}
        _atomic_write(json_path, json.dumps(record, indent=1, sort_keys=True).encode())
        _atomic_write(exe_path, blob)
        return len(blob)


def read_json(path: str) -> dict | None:
    """A small JSON file written by `write_json`, or None when missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path: str, value: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _atomic_write(path, json.dumps(jsonable(value), indent=1, sort_keys=True).encode())


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def _atomic_write(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
