"""Structured output: a request's `response_format` becomes a grammar, and a matcher per request
says which tokens may come next.

The grammar engine is llguidance (a Rust library with no Python dependencies; xgrammar, the other
candidate, needs torch at run time). Shapes of `response_format` (OpenAI's, then maxlike's
extensions, as vLLM and SGLang name them):

    {"type": "text"}                                       no constraint
    {"type": "json_object"}                                any JSON object
    {"type": "json_schema", "json_schema": {"schema": S}}  JSON valid against schema S
    {"type": "regex", "regex": R}                          text matching R
    {"type": "choice", "choices": [C1, C2, ...]}           exactly one of the strings
    {"type": "grammar", "grammar": G}                      Lark, or GBNF ("root ::= ...")

The shape is checked when SamplingParams is built (`maxlike.interfaces.check_response_format`); whether the engine can compile it is
checked when the request is admitted (`Grammars.matcher`), so a schema keyword llguidance does not
implement is a RequestError naming it. Each step the host fills a bitmask [rows, ceil(V / 32)]
(bit v of a row: token v allowed) for the constrained rows while the device runs the step's
forward pass; the sampler applies it on device. A row ends when its grammar is complete.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from maxlike.interfaces import RequestError

def grammar_text(response_format: dict) -> str:
    """llguidance's grammar for a (checked) response_format."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark

    kind = response_format["type"]
    if kind in ("json_object", "json_schema"):  # compact JSON (no free runs of whitespace), as OpenAI's
        schema = {"type": "object"} if kind == "json_object" else response_format["json_schema"]["schema"]
        return LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    if kind == "regex":
        return LLMatcher.grammar_from_regex(response_format["regex"])
    if kind == "choice":  # JSON string literals are Lark string literals
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in response_format["choices"]))
    return LLMatcher.grammar_from_lark(any_to_lark(response_format["grammar"]))  # GBNF is converted to Lark


def words(vocab: int) -> int:
    """32-bit words of a row's bitmask."""
    return (vocab + 31) // 32


class Grammars:
    """One per pipeline: the engine's view of the tokenizer (built on first use, about 1 s) and a
    matcher per constrained request."""

    def __init__(self, tokenizer: Any, vocab: int, eos_ids: frozenset[int]) -> None:
        self._tokenizer, self.vocab, self._eos = tokenizer, vocab, sorted(eos_ids)
        self._ll = None

    def _ll_tokenizer(self):
        if self._ll is None:
            from llguidance import LLTokenizer
            from tokenizers import Tokenizer

            backend = getattr(self._tokenizer, "backend_tokenizer", None)
            if backend is None:
                raise RequestError("response_format needs a fast (Rust) tokenizer; this model's tokenizer is "
                                   f"{type(self._tokenizer).__name__}.")
            copy = Tokenizer.from_str(backend.to_str())
            copy.no_padding()
            copy.no_truncation()
            self._ll = LLTokenizer(copy.to_str(), n_vocab=self.vocab, eos_token=self._eos or None)
        return self._ll

    def matcher(self, response_format: dict, request_id: str):
        """A fresh matcher for one request; a grammar the engine cannot compile is a RequestError
        that says why (llguidance names the keyword, e.g. 'Unimplemented keys: ["if"]')."""
        from llguidance import LLMatcher

        tokenizer = self._ll_tokenizer()
        try:
            grammar = grammar_text(response_format)
        except Exception as e:  # noqa: BLE001 - llguidance raises ValueError/RuntimeError with its reason
            raise RequestError(f"request {request_id}: response_format could not be compiled: {e}") from None
        m = LLMatcher(tokenizer, grammar)  # compiles the grammar; what it cannot compile leaves it in error
        if m.is_error():
            raise RequestError(f"request {request_id}: response_format is not supported: {m.get_error()}")
        return m

    def fill(self, matchers: list[tuple[int, Any]], rows: int) -> np.ndarray:
        """The next-token bitmask [rows, words] int32: each (row, matcher)'s allowed tokens, every
        token (-1) for the other rows."""
        from llguidance.numpy import fill_next_token_bitmask

        mask = np.full((rows, words(self.vocab)), -1, np.int32)
        for row, m in matchers:
            fill_next_token_bitmask(m, mask, row)
        return mask
