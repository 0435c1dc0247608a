"""Incremental detokenization: a request's new text at each step, without decoding its whole output.

Decoding all of a request's ids at every step costs O(n) per step, O(n^2) per request. An
`IncrementalDetokenizer` keeps a short window of ids instead: the ids of the last piece it returned
(context: decoders such as SentencePiece's drop the leading space of the first token, so a token's
text depends on the one before it) followed by the ids not shown yet. Each step decodes that window
and returns what it adds to the context's text, unless it ends with "\\ufffd": then the last bytes
may be the start of a character that a later token completes, and the text is held back.

Two ways to run that window:

* a tokenizer backed by a Rust `tokenizers.Tokenizer` whose decode is the tokenizer's decode
  (`LeanTokenizer`, transformers' fast tokenizers without clean-up or a decode of their own) goes
  through `tokenizers.decoders.DecodeStream`, which does the same in Rust, until it has held more
  than a few ids back (its buffer would grow with the output): then the Python window takes over;
* any other tokenizer (transformers' slow ones, fast ones that clean up spaces, anything with a
  `decode(ids, skip_special_tokens=)`) goes through the same window in Python, over `tokenizer.decode`.

Contract: "".join(step outputs) + finish() == tokenizer.decode(all ids, skip_special_tokens=...).
It needs a decoder that never changes the text of earlier ids when more come. Byte-level BPE (GPT-2,
Llama 3, Qwen2, SmolLM2) is one. A byte-fallback decoder (Llama 2, Mistral v0.1) is one except inside a
run of byte tokens ("<0xE2>"): the run decodes as a whole, to one "\\ufffd" per byte as soon as it is not
valid UTF-8, characters that were valid before included. So such runs are held until a token that is no
byte ends them, where the Rust tokenizer shows it has that decoder. A decode that does not keep earlier
text (possibly a slow tokenizer's) gets its new text as well as the window can tell.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

# Ids held back before the window looks for text it can show anyway (a long run of bytes that never
# becomes valid UTF-8, e.g. a model repeating a lone continuation byte); a character takes at most 4.
_MAX_HELD = 8
# How far back from the end of the window that search looks for a boundary.
_SPLIT_SEARCH = 8


class IncrementalDetokenizer:
    """The text of a growing sequence of ids, returned piece by piece as ids are fed."""

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        rust = self._rust = _backend(tokenizer)
        # Skipped special tokens are removed before the Rust decoder runs, so leaving them out of the
        # window changes no text, and a run of them cannot make the window grow.
        self._dropped = _special_ids(rust) if rust is not None and skip_special_tokens else frozenset()
        self._byte_ids = _byte_fallback_ids(rust) if rust is not None else frozenset()
        self._decode: Callable[[list[int]], str]
        if rust is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            from tokenizers.decoders import DecodeStream

            self._stream: Any = DecodeStream(skip_special_tokens=skip_special_tokens)
            self._decode = lambda ids: rust.decode(ids, skip_special_tokens=skip_special_tokens)
        else:  # transformers' clean-up of spaces runs after the Rust decode: DecodeStream lacks it
            self._stream = None
            self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        self._byte_run: list[int] = []  # trailing byte-fallback ids, fed once a token ends their run
        # The window: _ids[:_prefix_len] is the context (shown already), the rest is not shown yet.
        # In DecodeStream mode it mirrors DecodeStream's own buffer, which Python cannot read, for
        # finish() and for handing over to the Python window.
        self._ids: list[int] = []
        self._prefix_len = 0
        self._prefix_text = ""  # Python window only: decode(_ids[:_prefix_len])
        self._text = ""  # Python window only: decode(_ids)
        self._finished = False

    @property
    def uses_decode_stream(self) -> bool:
        """Whether steps go through tokenizers' DecodeStream (else through tokenizer.decode)."""
        return self._stream is not None

    def step(self, token_ids: Sequence[int]) -> str:
        """Feed new ids (one or several); the text they complete, "" when none is complete yet."""
        new = [int(t) for t in token_ids]
        new = [t for t in new if t not in self._dropped] if self._dropped else new
        if self._byte_ids:
            new = self._byte_run + new
            end = len(new)  # the run of byte tokens at the end of `new` starts at `end`
            while end and new[end - 1] in self._byte_ids:
                end -= 1
            new, self._byte_run = new[:end], new[end:]
        return self._feed(new)

    def finish(self) -> str:
        """The text held back at the end (e.g. bytes that never became valid UTF-8, as decode gives
        them: "\\ufffd" included). Call it once, after the last step."""
        if self._finished:
            return ""
        self._finished = True
        piece = self._feed(self._byte_run)
        shown = self._prefix_text if self._stream is None else self._decode(self._ids[:self._prefix_len])
        return piece + self._decode(self._ids)[len(shown):]

    def _feed(self, new: list[int]) -> str:
        if not new:
            return ""
        if self._stream is None:
            return self._window_step(new)
        try:
            piece = self._stream.step(self._rust, new)
        except Exception:
            # DecodeStream refuses text that no longer starts with what it returned before (its
            # InvalidPrefix: byte fallback, see the module docstring); the Python window goes on.
            self._leave_stream()
            return self._window_step(new)
        self._ids += new
        if piece is not None:  # DecodeStream keeps the ids of this piece as the next context
            del self._ids[:self._prefix_len]
            self._prefix_len = len(self._ids)
            return piece
        if len(self._ids) - self._prefix_len > _MAX_HELD:
            # DecodeStream would decode an ever longer buffer; the Python window can cut it.
            self._leave_stream()
        return ""

    def _leave_stream(self) -> None:
        """Go on with the Python window from DecodeStream's (mirrored) state."""
        self._stream = None
        self._prefix_text = self._decode(self._ids[:self._prefix_len])
        self._text = self._decode(self._ids)

    def _window_step(self, new: list[int]) -> str:
        ids = self._ids
        ids += new
        text = self._decode(ids)
        if text == self._text and not self._decode(new + new):
            # Ids that show nothing, even after themselves (skipped special tokens), need not stay in
            # the window. (A SentencePiece "▁" shows nothing alone, as first token, yet matters.)
            del ids[-len(new):]
            return ""
        self._text = text
        if len(text) > len(self._prefix_text) and not text.endswith("\ufffd"):
            piece = text[len(self._prefix_text):]
            # The ids of this piece are the context of the next one.
            del ids[:self._prefix_len]
            self._prefix_len = len(ids)
            self._prefix_text = self._text = self._decode(ids)
            return piece
        if len(ids) - self._prefix_len > _MAX_HELD:
            return self._split()
        return ""

    def _split(self) -> str:
        """After a long hold, show the window's text up to a boundary that no later id can move.

        For decoders that decode the bytes of all tokens together (byte-level BPE), the ids before j
        have final text when decode(ids[:j]) + decode(ids[j:]) == decode(ids) and ids[j:] has text:
        no character then spans j, and later ids can only change characters after it.
        """
        ids = self._ids
        for j in range(len(ids) - 1, max(self._prefix_len, len(ids) - _SPLIT_SEARCH), -1):
            head, tail = self._decode(ids[:j]), self._decode(ids[j:])
            if tail and head + tail == self._text:
                piece = head[len(self._prefix_text):]
                del ids[:j]  # the rest is not shown yet and needs no context: the boundary is clean
                self._prefix_len, self._prefix_text, self._text = 0, "", tail
                return piece
        return ""


def _backend(tokenizer: Any) -> Any:
    """The Rust `tokenizers.Tokenizer` whose decode `tokenizer.decode` is (maybe followed by
    transformers' clean-up of spaces), or None."""
    from tokenizers import Tokenizer

    rust = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(rust, Tokenizer) or _decodes_its_own_way(tokenizer):
        return None
    return rust


def _decodes_its_own_way(tokenizer: Any) -> bool:
    """Whether a transformers fast tokenizer overrides decode (e.g. Whisper's): its text is then
    more than its Rust tokenizer's."""
    transformers = sys.modules.get("transformers")  # a transformers tokenizer has imported it
    base = getattr(transformers, "PreTrainedTokenizerFast", None) if transformers is not None else None
    if base is None or not isinstance(tokenizer, base):
        return False
    return type(tokenizer).decode is not base.decode or type(tokenizer)._decode is not base._decode


def _byte_fallback_ids(rust: Any) -> frozenset[int]:
    """The ids of the byte tokens ("<0x00>" to "<0xFF>") when the decoder has a ByteFallback step."""
    if rust.decoder is None or b'"ByteFallback"' not in rust.decoder.__getstate__():
        return frozenset()
    ids = (rust.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in ids if i is not None)


def _special_ids(rust: Any) -> frozenset[int]:
    """The ids that decode(skip_special_tokens=True) leaves out."""
    return frozenset(i for i, token in rust.get_added_tokens_decoder().items() if token.special)
