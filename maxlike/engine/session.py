"""InferenceSession: owns the device mesh and the compiled executables.

Every model step is compiled ahead of time (`jit(...).lower(abstract).compile()`)
for one bucket of shapes and kept here by name and input signature, so a
signature is compiled once and every compile is counted and timed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from maxlike.cache_files import jsonable, read_json, write_json
from maxlike.engine import exe_cache
from maxlike.engine.exe_cache import ExecutableCache
from maxlike.sharding import MESH_AXES

log = logging.getLogger("maxlike")


class CompileForbiddenError(RuntimeError):
    pass


@dataclass
class CompileStats:
    compiled: int = 0
    compile_seconds: float = 0.0
    by_name: dict[str, int] = field(default_factory=dict)  # executables compiled or loaded, by name
    loaded: int = 0  # executables read from the ahead-of-time cache instead of compiled
    load_seconds: float = 0.0
    cached_bytes: int = 0  # written to the cache by this session
    prefetched: int = 0  # of the loaded: read in the background while the weights loaded
    records: list[dict] = field(default_factory=list)  # one per compile: name, seconds, bytes (serialized)

    def as_dict(self) -> dict[str, Any]:
        return {"compiled": self.compiled, "compile_seconds": round(self.compile_seconds, 3),
                "loaded": self.loaded, "load_seconds": round(self.load_seconds, 3),
                "cached_bytes": self.cached_bytes, "prefetched": self.prefetched, "by_name": dict(self.by_name)}


def _sharding_key(sharding: Any, ndim: int) -> Any:
    """Equal for equivalent shardings (a step's outputs may spell a spec differently)."""
    if sharding is None:
        return None
    if isinstance(sharding, NamedSharding):
        spec = list(sharding.spec) + [None] * (ndim - len(sharding.spec))
        return (tuple(sharding.mesh.shape.items()), tuple(d.id for d in sharding.mesh.devices.flat), tuple(spec))
    return (type(sharding).__name__, tuple(sorted(d.id for d in sharding.device_set)))


def signature(tree: Any) -> tuple:
    """What identifies a compiled program's arguments: tree structure, shapes, dtypes, shardings."""
    leaves, treedef = jax.tree.flatten(tree)
    return (treedef, tuple(
        (tuple(x.shape), str(x.dtype), _sharding_key(getattr(x, "sharding", None), len(x.shape))) for x in leaves))


def memory_analysis(exe) -> dict[str, int] | None:
    """XLA's buffer sizes of a compiled executable (bytes per device), or None where the
    backend does not report them."""
    try:
        stats = exe.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend (or deserialized executable) has it
        return None
    if stats is None:
        return None
    names = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
             "generated_code_size_in_bytes")
    return {name: int(getattr(stats, name, 0)) for name in names}


class InferenceSession:
    """A device mesh plus a table of compiled executables.

    devices: jax devices (default: the first local device).
    """

    def __init__(
        self,
        devices: Sequence[jax.Device] | None = None,
        data_parallel_degree: int = 1,
        tensor_parallel_degree: int | None = None,
        *,
        expert_parallel_degree: int = 1,
        cache_dir: str | None = None,
        target: str | None = None,
    ) -> None:
        devices = list(devices) if devices else jax.devices()[:1]
        dp, ep = data_parallel_degree, expert_parallel_degree
        tp = tensor_parallel_degree or len(devices) // (dp * ep)
        if dp * ep * tp != len(devices):
            raise ValueError(f"mesh data={dp} x expert={ep} x tensor={tp} needs {dp * ep * tp} devices, "
                             f"but {len(devices)} were given.")
        self.devices = devices
        self.mesh = Mesh(np.array(devices).reshape(dp, ep, tp), MESH_AXES)
        self.stats = CompileStats()
        self.forbid_compile = False
        self._executables: dict[tuple, Any] = {}
        # Ahead-of-time cache of serialized executables; the model adds what identifies
        # its programs (config, dtype, KV layout) to `cache_namespace` before compiling.
        self.cache = ExecutableCache(cache_dir) if cache_dir else None
        self.cache_namespace: dict[str, str] = {}
        # Compiling for hardware this machine lacks ("tpu:v5e:2x2"): executables are compiled and
        # stored, never loaded (they cannot be loaded onto devices that are not here).
        self.target = target
        # The largest temporary-buffer size (bytes per device) of any executable compiled or
        # loaded, from XLA's memory analysis: a step's real activation memory.
        self.peak_temp_bytes = 0
        # Matmul precision for everything this session compiles (jax.default_matmul_precision):
        # "highest" for float32 models, which GPUs would otherwise run as TF32 and TPUs as bf16 passes.
        self.matmul_precision: str | None = None
        # Warm starts: the executables the last start with this model and mesh used first are
        # loaded in the background (`prefetch`) while the weights load.
        self._recording = False
        self._first_used: list[str] = []
        self._listed: list[str] = []
        self._prefetched: dict[str, tuple] = {}
        self._prefetch_thread: threading.Thread | None = None

    @property
    def platform(self) -> str:
        return self.devices[0].platform

    @functools.cached_property
    def platform_version(self) -> str:
        """The backend's own version string (CUDA runtime and driver, libtpu build, ...)."""
        try:
            return str(self.devices[0].client.platform_version)
        except Exception:  # noqa: BLE001 - a compile target's devices have no client here
            return ""

    def compile(
        self,
        name: str,
        fn: Callable,
        args: tuple,
        *,
        donate_argnums: tuple[int, ...] = (),
        out_shardings: Any = None,
        key: Any = None,
    ) -> Callable:
        """Compile `fn` for the abstract (or concrete) `args`, once per signature.

        `key`, when given, stands for the signature: the caller promises that
        equal keys mean equal signatures (saves flattening big trees per call).
        """
        key = (name, signature(args) if key is None else key)
        exe = self._executables.get(key)
        if exe is not None:
            return exe
        parts = self._cache_parts(key, donate_argnums, out_shardings) if self.cache is not None else None
        if parts is not None and self.target is None:
            t0 = time.perf_counter()
            digest = self.cache.digest(parts)
            self._remember(digest)
            exe = self._take_prefetched(digest, parts)
            self.stats.prefetched += exe is not None
            if exe is None:
                exe = self.cache.load(parts, devices=list(self.mesh.devices.flat))
            if exe is not None:
                self.stats.loaded += 1
                self.stats.load_seconds += time.perf_counter() - t0
                self.stats.by_name[name] = self.stats.by_name.get(name, 0) + 1
                self._executables[key] = exe
                self._note_memory(exe)
                return exe
        if self.forbid_compile:
            raise CompileForbiddenError(f"compile of {name!r} requested after warm-up while compiles are forbidden.")
        abstract_args = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), args
        )
        t0 = time.perf_counter()
        # A fresh function object when the result is to be serialized: jax would hand back an executable
        # it compiled for `fn` earlier in this process, and once that has run it may no longer serialize
        # (XLA:CPU's sort specializes its comparator on the first run: "`LessThan` is not serializable").
        jitted = jax.jit(functools.partial(fn) if parts is not None else fn, donate_argnums=donate_argnums,
                         out_shardings=out_shardings)
        with jax.default_matmul_precision(self.matmul_precision) if self.matmul_precision else contextlib.nullcontext():
            exe = jitted.lower(*abstract_args).compile()
        dt = time.perf_counter() - t0
        self.stats.compiled += 1
        self.stats.compile_seconds += dt
        self.stats.by_name[name] = self.stats.by_name.get(name, 0) + 1
        log.debug("compiled %s in %.2fs", name, dt)
        self._executables[key] = exe
        memory = self._note_memory(exe)
        size = 0
        if parts is not None:
            notes = {"memory": memory, **({"target": self.target} if self.target else {})}
            size = self.cache.store(parts, exe, dt, notes=notes)
            self.stats.cached_bytes += size
        self.stats.records.append({"name": name, "seconds": round(dt, 3), "bytes": size})
        return exe

    FIRST_USED = 16  # how many executables a start remembers using first, for the next start to prefetch

    def _startup_list(self) -> str:
        """The file naming the executables this model and mesh used first (by cache digest)."""
        identity = {k: v for k, v in self._cache_parts(("", ()), (), None).items()
                    if k not in ("name", "signature", "donate", "out_shardings")}
        return os.path.join(self.cache.folder, "startup", self.cache.digest(identity) + ".json")

    def prefetch(self) -> None:
        """Start loading, on a background thread, the executables the previous start of this
        model on this mesh used first; `compile` takes them from there. Call it once the
        model has set `cache_namespace`, before the slow part of its setup (the weights)."""
        if self.cache is None or self.target is not None or self._prefetch_thread is not None:
            return
        self._recording = True  # a start that runs: the executables it uses first are the next start's list
        self._listed = list((read_json(self._startup_list()) or {}).get("digests", []))
        if not self._listed:
            return
        devices = list(self.mesh.devices.flat)

        def load_all() -> None:
            for digest in self._listed:
                try:
                    loaded = self.cache.load_digest(digest, devices)
                except Exception:  # noqa: BLE001 - the regular load reports a damaged entry
                    continue
                if loaded is not None:
                    self._prefetched[digest] = loaded

        self._prefetch_thread = threading.Thread(target=load_all, name="maxlike-prefetch", daemon=True)
        self._prefetch_thread.start()

    def wait_prefetch(self) -> None:
        """Let the background loads finish (no thread outlives the model's setup)."""
        if self._prefetch_thread is not None:
            self._prefetch_thread.join()

    def _take_prefetched(self, digest: str, parts: dict) -> Any:
        if digest not in self._listed:
            return None
        self.wait_prefetch()
        record_key, exe = self._prefetched.pop(digest, (None, None))
        return exe if exe is not None and record_key == jsonable(parts) else None

    def _remember(self, digest: str) -> None:
        # Only starts that run record their list: a compile-only session (warm-cache) compiles every
        # bucket in its own order, which says nothing of what a start uses first.
        if not self._recording or len(self._first_used) >= self.FIRST_USED or digest in self._first_used:
            return
        self._first_used.append(digest)
        if self._first_used != self._listed[:len(self._first_used)]:  # this start differs from the last
            try:
                write_json(self._startup_list(), {"digests": self._first_used})
            except OSError:
                pass

    def _note_memory(self, exe) -> dict[str, int] | None:
        memory = memory_analysis(exe)
        if memory:
            self.peak_temp_bytes = max(self.peak_temp_bytes, memory["temp_size_in_bytes"])
        return memory

    def _cache_parts(self, key: tuple, donate_argnums, out_shardings) -> dict[str, str]:
        """Everything that identifies a program, as strings (the cache entry's key and record)."""
        mesh = self.mesh
        return {
            "name": key[0], "signature": repr(key[1]), "donate": repr(tuple(donate_argnums)),
            "out_shardings": repr(jax.tree.map(lambda s: _sharding_key(s, 0), out_shardings)),
            "mesh": repr(tuple(mesh.shape.items())), "devices": repr(tuple(d.id for d in mesh.devices.flat)),
            "backend": self.platform, "device_kind": self.devices[0].device_kind,
            "platform_version": self.platform_version, **exe_cache.versions(), **exe_cache.program_settings(),
            "source": exe_cache.source_hash(), **self.cache_namespace,
        }

    def executables(self, name: str | None = None) -> list[Any]:
        return [e for (n, _), e in self._executables.items() if name is None or n == name]
