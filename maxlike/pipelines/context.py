"""TextContext: one sequence's state as the pipeline model sees it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from maxlike.interfaces import SamplingParams


@dataclass
class TextContext:
    """Tokens so far, how many are already in the KV cache, and the budget.

    `max_length` is the most tokens (prompt + generated) this sequence may
    reach; the pipeline reserves KV pages for it up front.
    """

    request_id: str
    tokens: np.ndarray  # [n] int32: prompt, then generated tokens
    max_length: int
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    cache_length: int = 0  # tokens already written to the KV cache
    prompt_length: int = 0
    chunk: int | None = None  # process at most this many pending tokens next step (chunked prefill)
    lora_name: str | None = None  # the LoRA adapter this sequence runs with (None: the base model)

    def __post_init__(self) -> None:
        self.tokens = np.asarray(self.tokens, np.int32)
        if not self.prompt_length:
            self.prompt_length = len(self.tokens)

    @property
    def pending(self) -> int:
        """Tokens not yet in the cache (1 while decoding; more before or during prefill)."""
        return len(self.tokens) - self.cache_length

    @property
    def next_tokens(self) -> np.ndarray:
        """What the next step processes: the pending tokens, or the next chunk of them."""
        end = len(self.tokens) if self.chunk is None else self.cache_length + self.chunk
        return self.tokens[self.cache_length : end]

    @property
    def generated(self) -> np.ndarray:
        return self.tokens[self.prompt_length :]
