"""The ahead-of-time executable cache: compiled programs serialized to disk.

An entry is keyed by everything that changes the program: the executable's name
and input signature, the model's fingerprint (config, dtype, KV layout, bucket
limits, the source of its architecture), the mesh (shape, device kinds,
backend and its platform version), jax, jaxlib and plugin (CUDA, libtpu)
versions, `XLA_FLAGS` and the jax options that change programs, and a hash of
maxlike's own source. Each entry is `<key>.exe` beside `<key>.json`, a readable
record of the key's parts, the size and the compile time.

An `.exe` holds a header (length, sha256 and an HMAC of the payload) and the
pickled `serialize_executable` payload. Unpickling runs code, so an entry is
only unpickled when its HMAC, keyed by this cache folder's secret (`.secret`,
created with 0600 permissions), matches: bytes written by anyone who cannot read
that secret (another user sharing the folder, a copied-in file) are refused.
A damaged, foreign or mismatched entry is reported with a warning and
recompiled; writes are atomic. A folder that cannot be written turns the
cache off with one warning.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import pickle
import secrets
import stat
import struct
import tempfile
import warnings
from typing import Any

import jax

from maxlike.cache_files import atomic_write, files_hash, jsonable, warn_unwritable

MAGIC = b"MAXLIKE-EXE-2\n"
_HEADER = struct.Struct("<Q32s32s")  # payload length, sha256 of the payload, HMAC of (key, sha256)
SECRET = ".secret"

# jax options that change the programs it builds (read where this jax version has them).
PROGRAM_OPTIONS = (
    "jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl", "jax_threefry_partitionable",
    "jax_numpy_dtype_promotion", "jax_softmax_custom_jvp", "jax_enable_custom_prng", "jax_use_shardy_partitioner",
    "jax_exec_time_optimization_effort", "jax_memory_fitting_effort", "jax_pallas_use_mosaic_gpu",
    "jax_dynamic_shapes", "jax_disable_jit",
)
# Environment variables that change what XLA compiles.
PROGRAM_ENV = ("XLA_FLAGS", "LIBTPU_INIT_ARGS")


class CacheEntryWarning(UserWarning):
    """A cache entry could not be used; the executable is compiled instead."""


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """A hash of maxlike's and graphs' Python source: a code change misses every entry."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = []
    for package in ("maxlike", "graphs"):
        for folder, _, files in sorted(os.walk(os.path.join(root, package))):
            paths += [os.path.join(folder, name) for name in sorted(files) if name.endswith(".py")]
    return files_hash(paths)


@functools.lru_cache(maxsize=1)
def _plugin_versions() -> tuple[tuple[str, str], ...]:
    """Installed XLA plugins (CUDA, ROCm, TPU): their compilers are part of the program."""
    import importlib.metadata

    found = set()
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith(("jax-cuda", "jax-rocm", "libtpu", "jax-tpu")):
            found.add((name, dist.version))
    return tuple(sorted(found))


def versions() -> dict[str, str]:
    """jax, jaxlib and every XLA plugin's version."""
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "plugins": ",".join(f"{n}={v}" for n, v in _plugin_versions())}


def program_settings() -> dict[str, str]:
    """The jax options and environment variables (XLA_FLAGS, ...) in force that change programs."""
    options = {}
    for name in PROGRAM_OPTIONS:
        try:
            options[name] = repr(getattr(jax.config, name))
        except AttributeError:  # not in this jax version
            continue
    env = {name: os.environ.get(name, "") for name in PROGRAM_ENV}
    return {"jax_options": repr(sorted(options.items())), "env": repr(sorted(env.items()))}


class ExecutableCache:
    """Serialized executables in `folder` (created on first write)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.writable = True  # false after the first failed write (warned once)
        self._secret: bytes | None = None
        self._secret_problem: str | None = None

    def _paths(self, digest: str) -> tuple[str, str]:
        return os.path.join(self.folder, digest + ".exe"), os.path.join(self.folder, digest + ".json")

    @staticmethod
    def digest(parts: dict[str, Any]) -> str:
        return hashlib.sha256(repr(sorted(parts.items())).encode()).hexdigest()[:40]

    # -- the folder's secret ---------------------------------------------------------
    def secret(self, create: bool = False) -> bytes | None:
        """This folder's HMAC key: None when absent (and not created) or not private to us.
        Raises OSError when `create` and the folder cannot be written."""
        if self._secret is not None:
            return self._secret
        path = os.path.join(self.folder, SECRET)
        if create and not os.path.exists(path):
            os.makedirs(self.folder, exist_ok=True)
            # Written whole under a temporary name, then linked into place (fails if it exists):
            # a process starting at the same moment (warm-cache --jobs) never reads a half-made secret.
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
            try:
                os.fchmod(fd, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(secrets.token_bytes(32))
                os.link(tmp, path)
            except FileExistsError:  # another process made it first: use theirs
                pass
            finally:
                os.unlink(tmp)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as e:  # e.g. another user's 0600 secret
            self._secret_problem = f"its secret {path} cannot be read ({e.strerror})"
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            key = f.read()
        if st.st_uid != os.getuid() or st.st_mode & (stat.S_IRWXG | stat.S_IRWXO) or len(key) < 32:
            self._secret_problem = (f"its secret {path} is not private to this user (mode "
                                    f"{stat.S_IMODE(st.st_mode):o}, owner {st.st_uid}); chmod 600 it or remove the "
                                    "folder")
            return None
        self._secret = key
        return key

    @staticmethod
    def _mac(secret: bytes, key_parts: Any, payload_sha: bytes) -> bytes:
        message = json.dumps(jsonable(key_parts), sort_keys=True).encode() + b"\0" + payload_sha
        return hmac.new(secret, message, hashlib.sha256).digest()

    # -- entries ---------------------------------------------------------------------
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
        raises when the entry is damaged or was not written by this cache."""
        exe_path, json_path = self._paths(digest)
        if not os.path.exists(exe_path):
            return None
        with open(exe_path, "rb") as f:
            blob = f.read()
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + _HEADER.size:
            raise ValueError("not an executable of this maxlike version (bad header)")
        size, checksum, mac = _HEADER.unpack_from(blob, len(MAGIC))
        payload = blob[len(MAGIC) + _HEADER.size:]
        if len(payload) != size:
            raise ValueError(f"truncated: {len(payload)} of {size} bytes")
        if hashlib.sha256(payload).digest() != checksum:
            raise ValueError("checksum mismatch")
        with open(json_path) as f:
            record = json.load(f)
        secret = self.secret()
        if secret is None:
            raise ValueError(f"not trusted: {self._secret_problem or 'this cache folder has no secret'}")
        if not hmac.compare_digest(mac, self._mac(secret, record.get("key"), checksum)):
            raise ValueError("not written by this cache (its signature does not match the folder's secret)")
        serialized, in_tree, out_tree = pickle.loads(payload)  # only after the signature matched
        from jax.experimental.serialize_executable import deserialize_and_load

        return record.get("key"), deserialize_and_load(serialized, in_tree, out_tree, execution_devices=devices)

    def store(self, parts: dict[str, Any], compiled, compile_seconds: float, notes: dict | None = None) -> int:
        """Write one entry atomically; returns its size in bytes (0 if it could not be serialized
        or written). `notes` go into the record only (not the key): the target, XLA's memory analysis."""
        if not self.writable:
            return 0
        from jax.experimental.serialize_executable import serialize

        try:
            payload = pickle.dumps(serialize(compiled))
        except Exception as e:  # noqa: BLE001 - some backends cannot serialize; run uncached
            warnings.warn(f"could not serialize executable {parts.get('name')!r} ({e}); not cached.",
                          CacheEntryWarning, stacklevel=3)
            return 0
        exe_path, json_path = self._paths(self.digest(parts))
        checksum = hashlib.sha256(payload).digest()
        try:
            secret = self.secret(create=True)
            if secret is None:
                raise PermissionError(self._secret_problem or "no secret")
            blob = MAGIC + _HEADER.pack(len(payload), checksum, self._mac(secret, parts, checksum)) + payload
            record = {"key": jsonable(parts), "bytes": len(blob), "compile_seconds": round(compile_seconds, 3),
                      **jsonable(notes or {})}
            atomic_write(json_path, json.dumps(record, indent=1, sort_keys=True).encode())
            atomic_write(exe_path, blob)
        except OSError as e:
            self.writable = False
            warn_unwritable("the executable cache", self.folder, e)
            return 0
        return len(blob)
