"""Request and response types shared by the pipeline, the scheduler and the server."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence


class RequestError(ValueError):
    """A request is invalid; it fails alone and the pipeline keeps serving."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. `top_k=1` or `temperature=0` is greedy.

    top_k <= 0 means the whole vocabulary; top_p is in (0, 1].
    `seed` makes a sampled request reproducible; None draws one.
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
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}.")
        if not self.temperature >= 0.0:
            raise RequestError(f"temperature must be >= 0 (0 is greedy), got {self.temperature!r}.")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1] (1 keeps every token), got {self.top_p!r}.")
        if not isinstance(self.top_k, int):
            raise RequestError(f"top_k must be an integer (<= 0 keeps every token), got {self.top_k!r}.")
        if self.logprobs < 0:
            raise RequestError(f"logprobs must be >= 0, got {self.logprobs!r}.")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

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

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise RequestError(f"request {self.request_id}: give exactly one of prompt or messages.")
        if self.prompt is not None and len(self.prompt) == 0:
            raise RequestError(f"request {self.request_id}: the prompt is empty; give at least one token or character.")
        if self.messages is not None and len(self.messages) == 0:
            raise RequestError(f"request {self.request_id}: messages is empty; give at least one message.")


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
