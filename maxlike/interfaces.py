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
MAX_LOGIT_BIAS = 300  # logit_bias entries per request (OpenAI's limit)
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_CHOICES = 16  # n


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


# response_format type -> the field that carries its constraint
_RESPONSE_FORMATS = {"text": None, "json_object": None, "json_schema": "json_schema", "regex": "regex",
                     "choice": "choices", "grammar": "grammar"}


def check_response_format(response_format) -> dict | None:
    """The response_format if its shape is right (None for no constraint), else a RequestError.
    The shapes: maxlike.pipelines.structured."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or response_format.get("type") not in _RESPONSE_FORMATS:
        raise RequestError(f"response_format must be a dict whose 'type' is one of "
                           f"{', '.join(_RESPONSE_FORMATS)}, got {response_format!r:.200}.")
    kind = response_format["type"]
    key = _RESPONSE_FORMATS[kind]
    if kind == "text":
        return None
    if key is not None and key not in response_format:
        raise RequestError(f"response_format of type {kind!r} needs a {key!r} field.")
    value = response_format.get(key) if key else None
    if kind == "json_schema" and not (isinstance(value, dict) and isinstance(value.get("schema"), (dict, bool))):
        raise RequestError("response_format json_schema must be {'type': 'json_schema', 'json_schema': "
                           "{'name': ..., 'schema': {...}}}: the schema goes under json_schema.schema.")
    if kind in ("regex", "grammar") and not (isinstance(value, str) and value):
        raise RequestError(f"response_format {kind!r} must be a non-empty string.")
    if kind == "choice" and not (isinstance(value, (list, tuple)) and value and
                                 all(isinstance(c, str) and c for c in value)):
        raise RequestError("response_format choices must be a non-empty list of non-empty strings.")
    return response_format


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. `top_k=1` or `temperature=0` is greedy.

    top_k <= 0 means the whole vocabulary; top_p is in (0, 1]; min_p in [0, 1] keeps the
    tokens whose probability is at least min_p times the most likely one's (0: off).
    `seed` (0 .. 2**32-1) makes a sampled request reproducible; None draws one.
    `logprobs` (0..20) top alternatives are returned per generated token; with
    `echo`, per prompt token too. Their values follow the pipeline's `logprobs_mode`.

    Logit processors, applied on device in this order before temperature:
    `logit_bias` (token id -> bias added to its logit, at most 300 entries),
    `min_new_tokens` (stop ids and EOS are masked until that many tokens are made),
    `repetition_penalty` (HF's: a token seen in the prompt or the output has a positive
    logit divided by it, a negative one multiplied; 1 is off), and `frequency_penalty` /
    `presence_penalty` (OpenAI's: logit -= count * frequency + (count > 0) * presence,
    counting output tokens only; in [-2, 2]).
    `stop`: strings; the text ends before the first of them, which is not returned.
    `n`: choices per prompt (LLM.generate and the server), choice j seeded with seed + j.
    `response_format`: OpenAI's shapes and maxlike's regex / choice / grammar (see
    maxlike.pipelines.structured); the output follows it, and ends when it is complete.
    Log-probabilities are always the model's own distribution, before processors and masks.
    Every field is checked here, with a message naming the field and its allowed range.
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
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_new_tokens: int = 0
    logit_bias: dict[int, float] | None = field(default=None, hash=False)  # hashing skips it (a dict)
    stop: tuple[str, ...] = ()
    n: int = 1
    response_format: dict | None = field(default=None, hash=False)

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
        need(_is_real(self.min_p) and 0.0 <= self.min_p <= 1.0,
             f"min_p must be in [0, 1] (0 keeps every token), got {self.min_p!r}.")
        need(_is_real(self.repetition_penalty) and math.isfinite(self.repetition_penalty)
             and self.repetition_penalty > 0.0,
             f"repetition_penalty must be a finite number > 0 (1 is off), got {self.repetition_penalty!r}.")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            need(_is_real(value) and -2.0 <= value <= 2.0, f"{name} must be in [-2, 2] (0 is off), got {value!r}.")
        need(_is_int(self.min_new_tokens) and self.min_new_tokens >= 0,
             f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}.")
        need(self.max_new_tokens is None or self.min_new_tokens <= self.max_new_tokens,
             f"min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens ({self.max_new_tokens}).")
        bias = self.logit_bias
        if bias is not None:
            need(isinstance(bias, dict), f"logit_bias must be a dict of token id -> bias, got {type(bias).__name__}.")
            need(len(bias) <= MAX_LOGIT_BIAS,
                 f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS} are allowed.")
            clean = {}
            for tok, b in bias.items():
                if isinstance(tok, str) and tok.strip().lstrip("-").isdigit():
                    tok = int(tok)  # JSON object keys are strings
                need(_is_int(tok) and tok >= 0, f"logit_bias keys must be token ids (integers >= 0), got {tok!r}.")
                need(_is_real(b) and -100.0 <= b <= 100.0,
                     f"logit_bias values must be numbers in [-100, 100], got {b!r} for token {tok}.")
                clean[int(tok)] = float(b)
            object.__setattr__(self, "logit_bias", clean or None)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        need(isinstance(stop, (list, tuple)) and all(isinstance(x, str) and x for x in stop),
             f"stop must be a string or a list of non-empty strings, got {self.stop!r}.")
        need(len(stop) <= MAX_STOP_STRINGS, f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed.")
        object.__setattr__(self, "stop", tuple(stop))
        need(_is_int(self.n) and 1 <= self.n <= MAX_CHOICES,
             f"n must be an integer in [1, {MAX_CHOICES}] (choices per prompt), got {self.n!r}.")
        object.__setattr__(self, "response_format", check_response_format(self.response_format))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def processed(self) -> bool:
        """Some logit processor (bias, minimum length, penalty) changes the logits."""
        return bool(self.logit_bias) or self.min_new_tokens > 0 or self.repetition_penalty != 1.0 \
            or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.response_format is not None

    @property
    def plain_greedy(self) -> bool:
        """The argmax of the model's own logits: no processor, no sampling."""
        return self.greedy and not self.processed

    def choice(self, j: int) -> "SamplingParams":
        """The parameters of choice j of n: seeded with seed + j (a random seed each when None)."""
        return self if j == 0 or self.seed is None else self.replace(seed=(self.seed + j) % (MAX_SEED + 1))

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
