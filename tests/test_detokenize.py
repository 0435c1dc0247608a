"""IncrementalDetokenizer: its pieces join to tokenizer.decode, never split a character, and cost O(n)."""

from __future__ import annotations

import random
from typing import Callable, Sequence

import pytest
from conftest import byte_tokenizer

from maxlike.pipelines.detokenize import IncrementalDetokenizer

TEXTS = [
    "Hello, world! Plain ASCII first.",
    " café, naïve, Ærøskøbing, Łódź, Þórr",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🙂👍🏽 flags 🇫🇷 family 👨‍👩‍👧 and ∑∞≠ math",
    "mixed: é🙂日 \n\ttabs  and   spaces  ",
]


class DecodeOnly:
    """A tokenizer that exposes only decode, so that the detokenizer must use its Python window."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.ids_decoded = 0  # ids passed to decode, in all calls together

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        self.ids_decoded += len(ids)
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def stream(tokenizer, ids: Sequence[int], *, skip_special_tokens: bool = True,
           sizes: Callable[[], int] = lambda: 1) -> tuple[list[str], str]:
    """(the pieces step returns, feeding `sizes()` ids at a time; what finish returns)."""
    det = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    pieces, i = [], 0
    while i < len(ids):
        n = sizes()
        pieces.append(det.step(ids[i:i + n]))
        i += n
    return pieces, det.finish()


def check_stream(tokenizer, reference, ids: Sequence[int], *, skip_special_tokens: bool,
                 sizes: Callable[[], int] = lambda: 1) -> None:
    """Pieces + finish == reference.decode, and no piece ends inside a character a later id completes:
    were it shown as "\ufffd", the text shown so far would stop being a prefix of the whole text."""
    pieces, tail = stream(tokenizer, ids, skip_special_tokens=skip_special_tokens, sizes=sizes)
    full = reference.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(pieces) + tail == full, (ids, pieces, tail)
    shown = ""
    for piece in pieces:
        shown += piece
        assert full.startswith(shown), (ids, pieces)


@pytest.fixture(scope="module")
def byte_tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_path):
    from maxlike.weights import load_tokenizer
    from maxlike.weights.lean import LeanTokenizer

    tok = load_tokenizer(smollm2_path)
    assert isinstance(tok, LeanTokenizer)
    return tok


def byte_ids(tok, data: bytes) -> list[int]:
    """byte_tokenizer ids of raw bytes, valid UTF-8 or not (its ids 3..258 are single bytes)."""
    from tokenizers import pre_tokenizers

    # GPT-2's table: ByteLevel writes each byte as one character (printable bytes as themselves),
    # and that character is the byte's token.
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    others = iter(range(256, 512))
    chars = [chr(b) if b in printable else chr(next(others)) for b in range(256)]
    assert set(chars) == set(pre_tokenizers.ByteLevel.alphabet())
    vocab = tok.get_vocab()
    return [vocab[chars[b]] for b in data]


# (a) ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("decode_only", [False, True], ids=["decode_stream", "window"])
def test_byte_level_pieces_never_split_a_character(byte_tok, decode_only):
    tok = DecodeOnly(byte_tok) if decode_only else byte_tok
    for text in TEXTS:
        ids = byte_tok.encode(text, add_special_tokens=False)
        assert len(ids) == len(text.encode("utf-8"))  # one id a byte: "é" and "🙂" span several ids
        det = IncrementalDetokenizer(tok)
        assert det.uses_decode_stream is not decode_only
        pieces = [det.step([i]) for i in ids]
        assert not any("\ufffd" in piece for piece in pieces), pieces
        assert "".join(pieces) + det.finish() == text


@pytest.mark.parametrize("decode_only", [False, True], ids=["decode_stream", "window"])
def test_finish_flushes_bytes_that_never_became_a_character(byte_tok, decode_only):
    tok = DecodeOnly(byte_tok) if decode_only else byte_tok
    ids = byte_ids(byte_tok, "a🙂".encode()[:3])  # "a" and half of "🙂"
    det = IncrementalDetokenizer(tok)
    assert [det.step([i]) for i in ids] == ["a", "", ""]
    assert det.finish() == "\ufffd"  # as decode gives it: "a\ufffd"
    assert byte_tok.decode(ids) == "a\ufffd"
    assert det.finish() == ""


# (b) ---------------------------------------------------------------------------------------------

def random_ids(rng: random.Random, vocab_size: int, specials: Sequence[int], bytes_: Sequence[int]) -> list[int]:
    """Ids that hit special tokens, single bytes (partial characters) and the rest of the vocabulary."""
    pick = [lambda: rng.choice(specials), lambda: rng.choice(bytes_), lambda: rng.randrange(vocab_size)]
    return [rng.choice(pick)() for _ in range(rng.randint(1, 40))]


def test_smollm2_texts(smollm2_tok):
    assert IncrementalDetokenizer(smollm2_tok).uses_decode_stream  # LeanTokenizer goes through Rust
    rng = random.Random(0)
    for text in TEXTS + ["<|im_start|>user\nBonjour 🙂<|im_end|>\n<|im_start|>assistant\n日本"]:
        ids = smollm2_tok.encode(text, add_special_tokens=False)
        for skip in (True, False):
            for tok in (smollm2_tok, DecodeOnly(smollm2_tok)):
                check_stream(tok, smollm2_tok, ids, skip_special_tokens=skip)
                check_stream(tok, smollm2_tok, ids, skip_special_tokens=skip, sizes=lambda: rng.randint(1, 4))


def test_smollm2_random_ids(smollm2_tok):
    rng = random.Random(1)
    vocab_size = 49152  # SmolLM2's
    for _ in range(300):
        # 0-16 are special; 17-272 single bytes (so many of these sequences are not valid UTF-8).
        ids = random_ids(rng, vocab_size, [0, 1, 2, 3, 16], range(17, 273))
        for skip in (True, False):
            for tok in (smollm2_tok, DecodeOnly(smollm2_tok)):
                check_stream(tok, smollm2_tok, ids, skip_special_tokens=skip, sizes=lambda: rng.randint(1, 3))


# (c) ---------------------------------------------------------------------------------------------

def test_transformers_fast_tokenizer_and_window(byte_tok):
    assert IncrementalDetokenizer(byte_tok).uses_decode_stream
    rng = random.Random(2)
    for text in TEXTS:
        ids = [1, *byte_tok.encode(text, add_special_tokens=False), 2]
        for skip in (True, False):
            for tok in (byte_tok, DecodeOnly(byte_tok)):
                check_stream(tok, byte_tok, ids, skip_special_tokens=skip, sizes=lambda: rng.randint(1, 3))
    # Bytes chosen to start, continue and break multi-byte characters; runs of one continuation byte.
    pool = byte_ids(byte_tok, bytes([0x41, 0x80, 0xBF, 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x99, 0xED, 0xFF]))
    for _ in range(300):
        ids = random_ids(rng, len(byte_tok), [0, 1, 2], pool)
        ids += pool[1:2] * rng.choice([0, 0, 12])
        if rng.random() < 0.3:
            rng.shuffle(ids)
        for skip in (True, False):
            for tok in (byte_tok, DecodeOnly(byte_tok)):
                check_stream(tok, byte_tok, ids, skip_special_tokens=skip, sizes=lambda: rng.randint(1, 3))


def test_transformers_clean_up_goes_through_decode(byte_tok):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=byte_tok.backend_tokenizer, clean_up_tokenization_spaces=True)
    # transformers cleans up spaces after the Rust decode, which DecodeStream would not do.
    assert not IncrementalDetokenizer(tok).uses_decode_stream


def byte_fallback_tokenizer():
    """A Llama 2 style tokenizer: SentencePiece-like pieces, "<0x..>" byte tokens for the rest."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": b + 3 for b in range(256)})
    for piece in ["▁", "▁Hello", "▁world", "▁a", "a", "é", "▁caf", "日"]:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


def test_byte_fallback_runs_are_held_until_they_end():
    """A byte-fallback decoder turns a whole run of byte tokens into "\ufffd"s once it is invalid
    UTF-8 (a shown "é" included), so the Rust path holds runs of byte tokens back."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=byte_fallback_tokenizer(), bos_token="<s>", eos_token="</s>")
    rng = random.Random(3)
    for text in ["Hello world", "  Hello  world ", "café 日本 🙂 a", "🙂🙂é"]:
        ids = tok.encode(text)
        for skip in (True, False):
            check_stream(tok, tok, [1, *ids, 2], skip_special_tokens=skip, sizes=lambda: rng.randint(1, 3))
    for _ in range(300):
        ids = random_ids(rng, len(tok), [1, 2], range(3, 259))
        for skip in (True, False):
            check_stream(tok, tok, ids, skip_special_tokens=skip, sizes=lambda: rng.randint(1, 3))


# (d) ---------------------------------------------------------------------------------------------

def long_ids(smollm2_tok, n: int) -> list[int]:
    words = [w for text in TEXTS for w in text.split()]
    rng = random.Random(4)
    ids: list[int] = []
    while len(ids) < n:
        ids += smollm2_tok.encode(" ".join(rng.choice(words) for _ in range(50)), add_special_tokens=False)
    return ids[:n]


def test_cost_is_linear_in_output_length(smollm2_tok):
    n = 2000
    ids = long_ids(smollm2_tok, n)
    counting = DecodeOnly(smollm2_tok)
    pieces, tail = stream(counting, ids)
    assert "".join(pieces) + tail == smollm2_tok.decode(ids, skip_special_tokens=True)
    # Re-decoding the whole output at every step would pass n * (n + 1) / 2 = 2,001,000 ids.
    assert counting.ids_decoded < 20 * n, counting.ids_decoded


@pytest.mark.parametrize("decode_only", [False, True], ids=["decode_stream", "window"])
@pytest.mark.parametrize("case", ["lone_continuation_byte", "special_tokens", "half_emoji_then_specials"])
def test_cost_stays_linear_when_nothing_can_be_shown(byte_tok, decode_only, case):
    """Runs that keep text held back (bytes that never become UTF-8, tokens that show nothing) must
    not make each step decode the whole run."""
    n = 2000
    cont, = byte_ids(byte_tok, b"\x80")
    ids = {"lone_continuation_byte": [cont] * n,
           "special_tokens": [0] * n,
           "half_emoji_then_specials": [*byte_ids(byte_tok, "🙂".encode()[:2]), *[1] * n,
                                        *byte_ids(byte_tok, "🙂".encode()[2:])]}[case]
    counting = DecodeOnly(byte_tok)
    det = IncrementalDetokenizer(counting if decode_only else byte_tok)
    if not decode_only:  # count what the detokenizer decodes itself, beside DecodeStream
        def counted(window: list[int], decode=det._decode) -> str:
            counting.ids_decoded += len(window)
            return decode(window)

        det._decode = counted
    pieces, widest = [], 0
    for i in ids:
        pieces.append(det.step([i]))
        # DecodeStream's work is out of Python's sight: it decodes its buffer at every step, which
        # det._ids mirrors (as it is the Python window's), so that buffer must stay short.
        widest = max(widest, len(det._ids))
    assert "".join(pieces) + det.finish() == byte_tok.decode(ids, skip_special_tokens=True)
    assert widest <= 24, widest
    assert counting.ids_decoded < 20 * n, counting.ids_decoded
