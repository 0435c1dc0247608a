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
from maxlike.pipelines.serving import ServingModel
from maxlike.pipelines.text_generation import TextGenerationPipeline
from maxlike.pipelines.decoder import DecoderPipelineModel


def _register_builtin() -> None:
    import graphs

    for graph in graphs.ARCHITECTURES:
        if graph.name not in PIPELINE_REGISTRY.architectures:
            PIPELINE_REGISTRY.register(SupportedArchitecture(graph.name, graph, DecoderPipelineModel))


_register_builtin()

__all__ = [
    "PipelineModel", "ModelInputs", "ModelOutputs", "ReturnLogits", "ReturnHiddenStates", "upper_bounded_default",
    "PipelineConfig", "KVCacheConfig", "SamplingConfig", "LoRAConfig", "TextGenerationPipeline",
    "SupportedArchitecture", "PIPELINE_REGISTRY", "PipelineRegistry", "LoRAManager", "DecoderPipelineModel",
    "TextContext", "ServingModel",
]
