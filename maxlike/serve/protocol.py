"""OpenAI's request bodies (the fields maxlike reads) and its error body.

Bodies are parsed strictly (a string is no number) and extra fields are accepted: the MAX / vLLM
extensions maxlike knows (`top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`,
`stop_token_ids`) are read, the others ignored, as those servers do. `response_format` takes
OpenAI's shapes and the regex / choice / grammar extensions (maxlike.pipelines.structured).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from maxlike.interfaces import MAX_CHOICES, MAX_LOGPROBS, MAX_STOP_STRINGS


class APIError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # extensions (MAX, vLLM)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class CompletionRequest(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None


ROLES = ("system", "developer", "user", "assistant")


def parse(model: type[BaseModel], body: bytes) -> Any:
    """The request body as `model`, or a 400 naming the field at fault."""
    if not body:
        raise APIError(400, "The request body is empty: send a JSON object.")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] in ("json_invalid", "json_type"):
            raise APIError(400, f"The request body is not valid JSON: {err['msg']}.") from None
        param = ".".join(str(p) for p in err["loc"] if not _is_type_tag(p))
        got = err.get("input")
        detail = "is required" if err["type"] == "missing" else f"{err['msg'].lower()} (got {got!r:.80})"
        raise APIError(400, f"'{param}' {detail}.", param=param) from None


def _is_type_tag(part: Any) -> bool:
    """pydantic puts the union member it tried into a location ('str', 'list[int]'); not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def check_common(body: _Body, max_new: int | None, max_name: str) -> None:
    """The ranges OpenAI checks, as 400s naming the parameter."""
    if max_new is not None and max_new < 1:
        raise APIError(400, f"'{max_name}' must be at least 1, got {max_new}.", param=max_name)
    if body.temperature is not None and body.temperature < 0:
        raise APIError(400, f"'temperature' must be >= 0 (0 is greedy), got {body.temperature}.", param="temperature")
    if body.top_p is not None and not 0 < body.top_p <= 1:
        raise APIError(400, f"'top_p' must be in (0, 1], got {body.top_p}.", param="top_p")
    if not 1 <= body.n <= MAX_CHOICES:
        raise APIError(400, f"'n' must be between 1 and {MAX_CHOICES}, got {body.n}.", param="n")
    stops = stop_strings(body)
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}.", param="stop")


def check_logprobs(value: int | None, name: str) -> None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise APIError(400, f"'{name}' must be between 0 and {MAX_LOGPROBS}, got {value}.", param=name)


def stop_strings(body: _Body) -> tuple[str, ...]:
    stop = body.stop
    return tuple(x for x in ((stop,) if isinstance(stop, str) else stop or ()) if x)  # "" stops nothing


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """OpenAI messages as the chat template takes them: a role and a string."""
    if not messages:
        raise APIError(400, "'messages' is empty: give at least one message.", param="messages")
    out = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise APIError(400, f"messages[{i}].role {m.role!r} is not a role: use one of {', '.join(ROLES)}.",
                           param=f"messages.{i}.role")
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{i}].content[{j}]: only text parts ({{'type': 'text', 'text': "
                                   f"...}}) are supported, got type {part.get('type')!r}.",
                                   param=f"messages.{i}.content.{j}")
                texts.append(part["text"])
            content = "".join(texts)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    return out


def completion_prompts(prompt: Any) -> list[str | list[int]]:
    """`prompt` in any of OpenAI's four forms, as a list of prompts."""
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise APIError(400, "'prompt' is empty: give a non-empty string or token ids.", param="prompt")
    return prompts

