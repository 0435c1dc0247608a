"""Request and response types shared by the pipeline, the scheduler and the server."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


class RequestError(ValueError):
    """A request is invalid; it fails alone and the pipeline keeps serving."""


MAX_SEED = 2**32 - 1
MAX_LOGPROBS = 20  # top log-probabilities per position (OpenAI's limit for top_logprobs)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. `top_k=1` or `temperature=0` is greedy.

    top_k <= 0 means the whole vocabulary; top_p is in (0, 1].
    `seed` (0 .. 2**32-1) makes a sampled request reproducible; None draws one.
    `logprobs` (0..20) top alternatives are returned per generated token; with
    `echo`, per prompt token too. Every field is checked here, with a message
    naming the field and its allowed range.
    """

    max_new_tokens: int | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int = 0
    echo: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise RequestError(message)

        need(self.max_new_tokens is None or (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1),
             f"max_new_tokens must be an integer >= 1 (or None: up to max_length), got {self.max_new_tokens!r}.")
        need(_is_real(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0.0,
             f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}.")
        need(_is_real(self.top_p) and 0.0 < self.top_p <= 1.0,
             f"top_p must be in (0, 1] (1 keeps every token), got {self.top_p!r}.")
        need(_is_int(self.top_k), f"top_k must be an integer (<= 0 keeps every token), got {self.top_k!r}.")
        need(self.seed is None or (_is_int(self.seed) and 0 <= self.seed <= MAX_SEED),
             f"seed must be an integer in [0, {MAX_SEED}] (or None for a random one), got {self.seed!r}.")
        need(_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs must be an integer in [0, {MAX_LOGPROBS}] (top alternatives per token), got "
             f"{self.logprobs!r}.")
        for name in ("ignore_eos", "echo"):
            need(isinstance(getattr(self, name), (bool, np.bool_)), f"{name} must be True or False, got "
                 f"{getattr(self, name)!r}.")
        ids = self.stop_token_ids
        need(not isinstance(ids, (str, bytes)) and all(_is_int(t) and t >= 0 for t in ids),
             f"stop_token_ids must be token ids (integers >= 0), got {ids!r}.")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def replace(self, **kw) -> "SamplingParams":
        return dataclasses.replace(self, **kw)


GREEDY = SamplingParams(top_k=1)


@dataclass
class TextGenerationRequest:
    """One generation request: a prompt (text or token ids) or chat messages."""

    request_id: str
    prompt: str | Sequence[int] | None = None
    messages: list[dict] | None = None
    sampling_params: SamplingParams = field(default_factory=lambda: GREEDY)
    lora_name: str | None = None  # a LoRA adapter the model has loaded (None: the base model)

    def __post_init__(self) -> None:
        rid = self.request_id
        if self.lora_name is not None and (not isinstance(self.lora_name, str) or not self.lora_name):
            raise RequestError(f"request {rid}: lora_name must be an adapter's name (a non-empty string) or None, "
                               f"got {self.lora_name!r}.")
        if not isinstance(rid, str) or not rid:
            raise RequestError(f"request_id must be a non-empty string, got {rid!r}.")
        if (self.prompt is None) == (self.messages is None):
            raise RequestError(f"request {rid}: give exactly one of prompt or messages.")
        if not isinstance(self.sampling_params, SamplingParams):
            raise RequestError(f"request {rid}: sampling_params must be a SamplingParams, got "
                               f"{type(self.sampling_params).__name__}.")
        if self.prompt is not None:
            if not isinstance(self.prompt, str) and not all(_is_int(t) for t in self.prompt):
                raise RequestError(f"request {rid}: a prompt is a string or a sequence of token ids (integers).")
            if len(self.prompt) == 0:
                raise RequestError(f"request {rid}: the prompt is empty; give at least one token or character.")
        if self.messages is not None:
            if len(self.messages) == 0:
                raise RequestError(f"request {rid}: messages is empty; give at least one message.")
            for i, m in enumerate(self.messages):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or \
                        not isinstance(m.get("content"), (str, list)):
                    raise RequestError(f"request {rid}: message {i} must be a dict with a 'role' string and a "
                                       f"'content' string (or list of parts), got {m!r:.200}.")


@dataclass
class LogProbabilities:
    """Log-probabilities of the chosen tokens and the top-n alternatives per position.

    Each `top_log_probabilities` dict always includes the chosen token.
    """

    token_log_probabilities: list[float]
    top_log_probabilities: list[dict[int, float]]


@dataclass
class TextGenerationOutput:
    request_id: str
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (EOS / stop token) or "length"
    log_probabilities: list[LogProbabilities] = field(default_factory=list)
