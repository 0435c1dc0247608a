"""Read checkpoints (HF safetensors directories, GGUF files) into host arrays.

Every file is checked (headers, sizes, tensor types) before any tensor is
read, so a bad file fails before anything is allocated on a device.
"""

from maxlike.cache_files import cache_root
from maxlike.weights.errors import WeightsError
from maxlike.weights.loader import (
    load_hf_config,
    load_tokenizer,
    read_weights,
    weights_format,
)

__all__ = ["cache_root", "WeightsError", "load_hf_config", "load_tokenizer", "read_weights", "weights_format"]
