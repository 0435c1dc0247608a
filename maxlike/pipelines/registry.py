"""PIPELINE_REGISTRY: architectures by HF name, and the factory that builds pipelines.

This module knows no model class: `maxlike.pipelines` registers the built-in
architectures (graphs.ARCHITECTURES with DecoderPipelineModel) when it is
imported, and users may register their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from maxlike.config import ConfigError, PipelineConfig


@dataclass(frozen=True)
class SupportedArchitecture:
    """An HF architecture name, its graph, and the PipelineModel class that runs it."""

    name: str
    graph: Any  # graphs.Architecture
    pipeline_model: type  # a ServingModel subclass
    task: str = "text_generation"
    supported_encodings: tuple[str, ...] = ("float32", "bfloat16", "float16")
    example_repo_ids: tuple[str, ...] = field(default_factory=tuple)


class PipelineRegistry:
    def __init__(self) -> None:
        self.architectures: dict[str, SupportedArchitecture] = {}

    def register(self, arch: SupportedArchitecture) -> None:
        if arch.name in self.architectures:
            raise ValueError(f"architecture {arch.name!r} is already registered.")
        self.architectures[arch.name] = arch

    def retrieve_architecture(self, huggingface_config: Any) -> SupportedArchitecture:
        """The registered architecture for an HF config (by `architectures`, else `model_type`)."""
        names = list(getattr(huggingface_config, "architectures", None) or [])
        for name in names:
            if name in self.architectures:
                return self.architectures[name]
        model_type = getattr(huggingface_config, "model_type", None)
        if not names:
            for arch in self.architectures.values():
                if model_type in arch.graph.model_types:
                    return arch
        asked = names or [f"model_type={model_type!r}"]
        raise ConfigError(
            f"unsupported architecture {', '.join(map(str, asked))}: maxlike supports "
            f"{', '.join(sorted(self.architectures))}."
        )

    def retrieve(self, pipeline_config: PipelineConfig, *, progress: bool = True, session=None):
        """Build (tokenizer, TextGenerationPipeline) for a config, as MAX's registry does."""
        from maxlike.engine.mesh import session_for
        from maxlike.pipelines.model import ReturnLogits
        from maxlike.pipelines.serving import ServingModel
        from maxlike.pipelines.text_generation import TextGenerationPipeline
        from maxlike.weights import load_hf_config, load_tokenizer

        hf = load_hf_config(pipeline_config.model.model_path)
        arch = self.retrieve_architecture(hf)
        if session is None:
            cfg = arch.graph.config_from_hf(hf)
            moe = getattr(cfg, "moe", None)
            session = session_for(pipeline_config, q_heads=cfg.q_heads, kv_heads=cfg.kv_heads,
                                  vocab=cfg.vocab_size, intermediate=cfg.intermediate_size,
                                  experts=moe.experts if moe else 0, expert_width=moe.width if moe else 0)
        return_logits = ReturnLogits.ALL if pipeline_config.sampling.enable_echo else ReturnLogits.LAST_TOKEN
        tokenizer = load_tokenizer(pipeline_config.model.model_path)
        model = arch.pipeline_model(
            pipeline_config, session, session.devices, pipeline_config.kv_cache, None, arch.graph, return_logits,
            progress=progress,
        )
        if not isinstance(model, ServingModel):
            raise ConfigError(f"{type(model).__name__} (registered for {arch.name}) is not a ServingModel: "
                              "TextGenerationPipeline serves only models that implement maxlike.pipelines."
                              "serving.ServingModel.")
        pipeline = TextGenerationPipeline(pipeline_config, model, tokenizer)
        if pipeline_config.warmup:
            pipeline.warmup(progress=progress)
            session.forbid_compile = pipeline_config.forbid_compile
        return tokenizer, pipeline


PIPELINE_REGISTRY = PipelineRegistry()  # maxlike.pipelines registers graphs.ARCHITECTURES on import
