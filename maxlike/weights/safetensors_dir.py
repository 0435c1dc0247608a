"""HF safetensors directories: one file or shards with `model.safetensors.index.json`."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
from safetensors import safe_open

from maxlike.weights.errors import WeightsError


def _check_header(path: str) -> list[str]:
    """Validate a safetensors file's header against its size; return its tensor names."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"safetensors file {path!r} is truncated or corrupt ({size} bytes): re-download it.")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise WeightsError(f"safetensors file {path!r} is truncated or corrupt: its header claims {n} bytes "
                         f"but the file has {size}. Re-download it.")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"safetensors file {path!r} is corrupt: unreadable header ({e}). Re-download it.") from None
    data_bytes = size - 8 - n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        end = meta["data_offsets"][1]
        if end > data_bytes:
            raise WeightsError(f"safetensors file {path!r} is truncated: tensor {name!r} ends at byte {end} of the "
                         f"data section, which has only {data_bytes}. Re-download it.")
    return [k for k in header if k != "__metadata__"]


class SafetensorsReader:
    def __init__(self, files: dict[str, str]):
        self._files = files  # tensor name -> file
        self._handles: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def read(self, name: str) -> np.ndarray:
        path = self._files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="numpy")
        return self._handles[path].get_tensor(name)


def open_checked(model_dir: str, files: list[str] | None = None) -> SafetensorsReader:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if files:
        paths = list(files)
    elif os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        paths = sorted(set(weight_map.values()))
    else:
        paths = sorted(p for p in os.listdir(model_dir) if p.endswith(".safetensors"))
    if not paths:
        raise WeightsError(f"{model_dir!r} has no .safetensors files: convert the checkpoint to safetensors "
                     "(e.g. save_pretrained(..., safe_serialization=True)) or pass a .gguf file.")
    files: dict[str, str] = {}
    for p in paths:
        full = os.path.join(model_dir, p)
        if not os.path.isfile(full):
            raise WeightsError(f"weight file {p!r} of {model_dir!r} is missing: re-download the model or fix weight_path.")
        for name in _check_header(full):
            files[name] = full
    return SafetensorsReader(files)
