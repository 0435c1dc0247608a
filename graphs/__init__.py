"""Model graphs: pure math over pytrees, one file per architecture family.

`ARCHITECTURES` lists every architecture this package provides; the runtime
finds them through it (by HF `architectures` name or `model_type`) and never
names one itself.
"""

from graphs.base import ArchConfig, Architecture, Source, UnsupportedConfigError, WeightSpec
from graphs.gemma import GEMMA_FAMILY
from graphs.llama import LLAMA_FAMILY

ARCHITECTURES: tuple[Architecture, ...] = LLAMA_FAMILY + GEMMA_FAMILY

__all__ = ["ARCHITECTURES", "ArchConfig", "Architecture", "Source", "UnsupportedConfigError", "WeightSpec"]
