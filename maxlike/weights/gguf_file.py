"""GGUF files: checked, then dequantized tensor by tensor through the `gguf` package."""

from __future__ import annotations

import functools
import os

import numpy as np

from maxlike.weights.errors import WeightsError

SUPPORTED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")


def _reader(path: str):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError, IndexError, struct errors...
        raise WeightsError(f"GGUF file {path!r} is truncated or corrupt ({type(e).__name__}: {e}). Re-download it.") from None


def check_file(path: str):
    """Open a GGUF file and check every tensor fits in the file and has a type we read.

    Cached per file identity: parsing the metadata (a 49k-token vocabulary for
    SmolLM2) takes seconds, and a cold load asks twice (config, then weights).
    """
    st = os.stat(path)
    return _checked(os.path.abspath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _checked(path: str, mtime_ns: int, size: int):
    reader = _reader(path)
    for t in reader.tensors:
        name = t.tensor_type.name
        if name not in SUPPORTED:
            raise WeightsError(
                f"GGUF tensor {t.name!r} in {path!r} is quantized as {name}, which maxlike does not read. "
                f"Supported types: {', '.join(SUPPORTED)}. Use a GGUF quantized to one of those."
            )
        if t.data_offset + t.n_bytes > size:
            raise WeightsError(f"GGUF file {path!r} is truncated: tensor {t.name!r} ends past the end of the file. "
                         "Re-download it.")
    return reader


class GGUFTensors:
    def __init__(self, reader):
        self._tensors = {t.name: t for t in reader.tensors}

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def quant_type(self, name: str) -> str:
        """The tensor's GGUF type name ("F32", "Q8_0", "Q4_K", ...)."""
        return self._tensors[name].tensor_type.name

    def read_blocks(self, name: str) -> dict[str, np.ndarray]:
        """A quantized tensor kept as its blocks hold it (`maxlike.weights.gguf_blocks.decode`),
        in HF layout: {"": values [rows, cols], "_scale" / "_offset": [rows, cols / 32]}."""
        from maxlike.weights.gguf_blocks import decode

        t = self._tensors[name]
        rows, cols = int(np.prod(t.shape[1:])), int(t.shape[0])  # ggml lists dims fastest-first
        return decode(t.data, t.tensor_type.name, rows, cols)

    def read(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self._tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists dims fastest-first
        return dequantize(t.data, t.tensor_type).reshape(shape)


def open_checked(path: str) -> GGUFTensors:
    return GGUFTensors(check_file(path))
