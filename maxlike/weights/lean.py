"""Config and tokenizer without importing transformers on warm starts.

Importing transformers takes about 3 s where torch is installed (it imports torch),
half of a warm start. The first load of a model still goes through transformers
(AutoConfig fills in every default an architecture has); its full config is kept
as JSON and read back as an attribute view afterwards. The tokenizer is the
`tokenizers` library's own (the Rust object transformers' fast tokenizers wrap)
plus a chat-template renderer set up as transformers sets up its own; tokenizer
configurations that ask for anything more fall back to transformers.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from typing import Any


class HFConfigView:
    """A config's every field (transformers' `to_dict()`) as read-only attributes."""

    def __init__(self, values: dict[str, Any]) -> None:
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("an HFConfigView is read-only")

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def __repr__(self) -> str:
        return f"HFConfigView(model_type={self._values.get('model_type')!r})"


def text_config_of(hf: Any) -> Any:
    """The language model's config: a multimodal config's `text_config` (as transformers'
    `get_text_config()` finds it), else the config itself."""
    if hasattr(hf, "get_text_config"):
        return hf.get_text_config()
    text = getattr(hf, "text_config", None)
    return HFConfigView(text) if isinstance(text, dict) else hf


# tokenizer_config.json keys that change nothing LeanTokenizer does (clean-up must also be off).
_KNOWN_KEYS = {
    "added_tokens_decoder", "backend", "bos_token", "chat_template", "clean_up_tokenization_spaces", "eos_token",
    "is_local", "local_files_only", "model_input_names", "model_max_length", "pad_token", "padding_side",
    "tokenizer_class", "truncation_side", "unk_token",
}
_PLAIN_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class LeanTokenizer:
    """encode, decode and apply_chat_template of a plain fast tokenizer, as transformers does them."""

    def __init__(self, tokenizer, settings: dict[str, Any], chat_template: str | None) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        self.special_tokens = {name: _token_text(settings.get(name))
                               for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
        eos = self.special_tokens["eos_token"]
        self.eos_token_id = tokenizer.token_to_id(eos) if eos else None

    @classmethod
    def load(cls, folder: str) -> "LeanTokenizer | None":
        """The tokenizer of an HF folder, or None when it needs transformers (no tokenizer.json,
        or tokenizer_config.json asks for behaviour beyond the plain fast tokenizer)."""
        path, config_path = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "tokenizer_config.json")
        if not (os.path.isfile(path) and os.path.isfile(config_path)):
            return None
        with open(config_path, encoding="utf-8") as f:
            settings = json.load(f)
        if (set(settings) - _KNOWN_KEYS or settings.get("tokenizer_class", "TokenizersBackend") not in _PLAIN_CLASSES
                or settings.get("clean_up_tokenization_spaces")):  # its rules differ between transformers versions
            return None
        template = settings.get("chat_template")
        template_path = os.path.join(folder, "chat_template.jinja")
        if template is None and os.path.isfile(template_path):
            with open(template_path, encoding="utf-8") as f:
                template = f.read()
        if template is not None:
            if not isinstance(template, str):
                return None  # named templates (a list): transformers picks among them
            import jinja2

            try:
                _compiled_template(template)
            except jinja2.TemplateSyntaxError:  # e.g. transformers' own {% generation %} tag
                return None
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(path), settings, template)

    @property
    def backend_tokenizer(self):
        """The `tokenizers.Tokenizer` underneath (as transformers' fast tokenizers name it)."""
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = True):
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template.")
        text = _compiled_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
            **{k: v for k, v in self.special_tokens.items() if v is not None})
        # The template writes the special tokens itself: none are added when it is tokenized.
        return self.encode(text, add_special_tokens=False) if tokenize else text


@lru_cache(maxsize=8)
def _compiled_template(source: str):
    """A chat template in a sandboxed jinja2 environment with the helpers chat templates expect."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
