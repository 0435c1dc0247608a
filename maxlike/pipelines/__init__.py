"""MAX's pipeline layer on JAX/XLA."""

from maxlike.config import KVCacheConfig, LoRAConfig, PipelineConfig, SamplingConfig
from maxlike.pipelines.context import TextContext
from maxlike.pipelines.lora import LoRAManager
from maxlike.pipelines.model import (
    ModelInputs,
    ModelOutputs,
    PipelineModel,
    ReturnHiddenStates,
    ReturnLogits,
    upper_bounded_default,
)
from maxlike.pipelines.registry import PIPELINE_REGISTRY, PipelineRegistry, SupportedArchitecture
from maxlike.pipelines.text_generation import TextGenerationPipeline
from maxlike.pipelines.decoder import DecoderPipelineModel

__all__ = [
    "PipelineModel", "ModelInputs", "ModelOutputs", "ReturnLogits", "ReturnHiddenStates", "upper_bounded_default",
    "PipelineConfig", "KVCacheConfig", "SamplingConfig", "LoRAConfig", "TextGenerationPipeline",
    "SupportedArchitecture", "PIPELINE_REGISTRY", "PipelineRegistry", "LoRAManager", "DecoderPipelineModel",
    "TextContext",
]
