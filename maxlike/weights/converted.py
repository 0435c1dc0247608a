"""Converted-weights cache: a model's weights after conversion, as an orbax checkpoint.

The first load of a GGUF or safetensors model reads, dequantizes, renames and
casts every tensor; that work is saved under `<cache>/weights/<key>`, keyed by
the source files' identity (path, size, modification time), the conversion
settings (dtype, names, shapes) and the conversion's code (the architecture's
name map, our readers, the gguf and safetensors versions). Later loads restore
the checkpoint straight into the mesh's shardings, skipping the source files. A checkpoint that cannot
be restored is reported with a warning and the source is read instead.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import warnings
from typing import Any

import jax

from maxlike.cache_files import defining_files, files_hash
from maxlike.weights.loader import checkpoint_files


class WeightsCacheWarning(UserWarning):
    """The converted-weights cache could not be used; weights come from the source files."""


def source_files(model_path: str, weight_path: tuple[str, ...] = ()) -> list[str]:
    """The files a model's weights are read from (the identity of the conversion's input)."""
    files = checkpoint_files(model_path, weight_path)
    if not files:  # a safetensors directory: its weights, index and config
        files = sorted(os.path.join(model_path, p) for p in os.listdir(model_path)
                       if p.endswith(".safetensors") or p.endswith(".json"))
    return [p for p in files if os.path.isfile(p)]


@functools.lru_cache(maxsize=8)
def _code_hash(code: tuple) -> str:
    """The conversion's code: the architecture's name map and layout (`code`), our readers,
    and the versions of the libraries that decode the files (gguf dequantizes)."""
    import importlib.metadata

    from maxlike.weights import gguf_file, loader, safetensors_dir

    files = defining_files(*code, gguf_file, loader, safetensors_dir, sys.modules[__name__])
    libraries = []
    for name in ("gguf", "safetensors"):
        try:
            libraries.append(f"{name}={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:  # not installed: none of its files can have been read
            libraries.append(f"{name}=absent")
    return files_hash(files) + ",".join(libraries)


def checkpoint_dir(cache_root: str, model_path: str, weight_path: tuple[str, ...], conversion: Any,
                   code: tuple = ()) -> str:
    """The checkpoint folder for one conversion (`conversion`: settings; `code`: the functions
    that convert) of one model's files."""
    h = hashlib.sha256(repr(conversion).encode() + _code_hash(tuple(code)).encode())
    for path in source_files(model_path, weight_path):
        st = os.stat(path)
        h.update(repr((os.path.abspath(path), st.st_size, st.st_mtime_ns)).encode())
    return os.path.join(cache_root, "weights", h.hexdigest()[:32])


def restore(path: str, abstract: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array] | None:
    """The checkpoint at `path` placed with `abstract`'s shardings, or None (absent or unusable: warned)."""
    if not os.path.isdir(path):
        return None
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as ckpt:
            return ckpt.restore(path, abstract)
    except Exception as e:  # noqa: BLE001 - any failure means: read the source instead
        warnings.warn(f"converted weights at {path} could not be restored ({str(e).splitlines()[0][:200]}); "
                      "reading the model's files instead (and replacing that checkpoint).", WeightsCacheWarning,
                      stacklevel=2)
        shutil.rmtree(path, ignore_errors=True)
        return None


def save(path: str, params: dict) -> bool:
    """Write the converted weights: device arrays, or host arrays (warm-cache converts without a
    device). Orbax writes to a temporary folder and renames it when complete. False (warned)
    when it cannot be written."""
    import orbax.checkpoint as ocp

    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(path, params)
            ckpt.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - a cache that cannot be written is not an error
        warnings.warn(f"could not save converted weights to {path} ({str(e).splitlines()[0][:200]}).",
                      WeightsCacheWarning, stacklevel=2)
        return False
    return True
