"""Logit processors, min-p, stop strings and n, against HF transformers and formulas written out here."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from maxlike.interfaces import RequestError, SamplingParams
from maxlike.pipelines import PipelineConfig, sampling

PROMPT = [5, 9, 17, 33, 5, 9, 17, 33]  # the tiny model's greedy output repeats itself after it


@pytest.fixture(scope="module")
def looped(tiny_llama):
    """The tiny Llama with 4 decode steps per call: penalties' history is carried on device."""
    from maxlike.entrypoints import LLM

    return LLM(PipelineConfig(model_path=tiny_llama[0], max_length=128, max_batch_size=4, dtype="float32",
                              max_num_steps=4), progress=False)


def _ours(llm, prompt, **kw):
    params = SamplingParams(top_k=1, ignore_eos=True, **kw)
    return llm.generate_outputs([prompt], sampling_params=params, use_tqdm=False)[0]


def _hf(model, prompt, n, **kw):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


def test_repetition_penalty_equals_hf_greedy(looped, tiny_llama):
    got = _ours(looped, PROMPT, max_new_tokens=24, repetition_penalty=1.3).token_ids
    assert got == _hf(tiny_llama[1], PROMPT, 24, repetition_penalty=1.3, eos_token_id=None)
    assert got != _ours(looped, PROMPT, max_new_tokens=24).token_ids  # the penalty changed the output


class OpenAIPenalties:
    """The OpenAI formula written out as an HF logits processor: over the output tokens so far,
    logit -= count * frequency + (count > 0) * presence."""

    def __init__(self, prompt_length: int, frequency: float, presence: float) -> None:
        self.start, self.frequency, self.presence = prompt_length, frequency, presence

    def __call__(self, input_ids, scores):
        for row in range(scores.shape[0]):
            counts = torch.bincount(input_ids[row, self.start:], minlength=scores.shape[1]).to(scores.dtype)
            scores[row] -= counts * self.frequency + (counts > 0).to(scores.dtype) * self.presence
        return scores


@pytest.mark.parametrize("frequency,presence", [pytest.param(0.9, 0.0, marks=pytest.mark.slow),
                                                pytest.param(0.0, 1.5, marks=pytest.mark.slow), (0.6, 0.7), (-0.5, 0.0)])
def test_frequency_and_presence_penalties_equal_the_openai_formula(looped, tiny_llama, frequency, presence):
    from transformers import LogitsProcessorList

    got = _ours(looped, PROMPT, max_new_tokens=20, frequency_penalty=frequency, presence_penalty=presence)
    proc = LogitsProcessorList([OpenAIPenalties(len(PROMPT), frequency, presence)])
    assert got.token_ids == _hf(tiny_llama[1], PROMPT, 20, logits_processor=proc, eos_token_id=None)


def test_min_new_tokens_pushes_a_stop_token_past_the_minimum(looped, tiny_llama):
    free = _ours(looped, PROMPT, max_new_tokens=24).token_ids
    stop = free[2]
    early = looped.generate_outputs([PROMPT], sampling_params=SamplingParams(
        top_k=1, stop_token_ids=(stop,), max_new_tokens=24), use_tqdm=False)[0]
    assert early.token_ids == free[:3] and early.finish_reason == "stop"
    late = looped.generate_outputs([PROMPT], sampling_params=SamplingParams(
        top_k=1, stop_token_ids=(stop,), min_new_tokens=12, max_new_tokens=24), use_tqdm=False)[0]
    assert stop not in late.token_ids[:12]
    ref = _hf(tiny_llama[1], PROMPT, 24, min_new_tokens=12, eos_token_id=stop)
    ref = ref[: ref.index(stop) + 1] if stop in ref else ref
    assert late.token_ids == ref


def test_a_large_logit_bias_forces_a_token_and_a_batch_keeps_other_rows_unchanged(looped):
    free = _ours(looped, PROMPT, max_new_tokens=8).token_ids
    params = [SamplingParams(top_k=1, ignore_eos=True, max_new_tokens=8, logit_bias={"77": 100.0}),
              SamplingParams(top_k=1, ignore_eos=True, max_new_tokens=8)]
    forced, other = looped.generate_outputs([PROMPT, PROMPT], sampling_params=params, use_tqdm=False)
    assert forced.token_ids == [77] * 8 and other.token_ids == free


def test_stop_strings_spanning_tokens_cut_the_text_exactly(looped):
    """The byte tokenizer makes each character a token: a 3-character stop string spans 3 tokens."""
    from maxlike.interfaces import TextGenerationRequest

    full = _ours(looped, PROMPT, max_new_tokens=30)
    text = full.text
    stop = text[6:9]
    cut = text[: text.index(stop)]
    out = _ours(looped, PROMPT, max_new_tokens=30, stop=(stop, "never there"))
    assert out.text == cut and out.finish_reason == "stop" and len(out.token_ids) < 30
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    params = SamplingParams(top_k=1, ignore_eos=True, max_new_tokens=30, stop=stop)
    pieces = list(looped.stream(TextGenerationRequest("s", prompt=PROMPT, sampling_params=params)))
    assert "".join(pieces) == cut


def test_n_choices_differ_and_repeat_with_their_seed(looped):
    params = SamplingParams(temperature=1.0, seed=11, n=4, max_new_tokens=12, ignore_eos=True)
    first = looped.generate_outputs([PROMPT], sampling_params=params, use_tqdm=False)
    again = looped.generate_outputs([PROMPT], sampling_params=params, use_tqdm=False)
    assert len(first) == 4 and len({tuple(o.token_ids) for o in first}) == 4
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    one = SamplingParams(temperature=1.0, seed=13, max_new_tokens=12, ignore_eos=True)  # choice 2 is seed 11 + 2
    assert looped.generate_outputs([PROMPT], sampling_params=one, use_tqdm=False)[0].token_ids == first[2].token_ids


@pytest.mark.parametrize("kw,message", [
    (dict(min_p=1.5), "min_p must be in \\[0, 1\\]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(frequency_penalty=3.0), "frequency_penalty must be in \\[-2, 2\\]"),
    (dict(presence_penalty=-2.5), "presence_penalty must be in \\[-2, 2\\]"),
    (dict(min_new_tokens=-1), "min_new_tokens must be an integer >= 0"),
    (dict(min_new_tokens=9, max_new_tokens=4), "must not exceed max_new_tokens"),
    (dict(logit_bias={i: 1.0 for i in range(301)}), "at most 300 are allowed"),
    (dict(logit_bias={"x": 1.0}), "logit_bias keys must be token ids"),
    (dict(logit_bias={3: 101.0}), "logit_bias values must be numbers in \\[-100, 100\\]"),
    (dict(stop=["ok", ""]), "stop must be a string or a list of non-empty strings"),
    (dict(stop=["a", "b", "c", "d", "e"]), "at most 4 are allowed"),
    (dict(n=0), "n must be an integer in \\[1, 16\\]"),
])
def test_bad_sampling_fields_are_clear_errors(kw, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams(**kw)


# -- the sampler's draws against the exact distribution, from SmolLM2's logits in HF ------------------

def _exact(logits: np.ndarray, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0) -> np.ndarray:
    """HF's warpers in HF's order, written out: temperature, top-k, top-p (drop the tokens whose
    ascending cumulative mass is <= 1 - top_p), min-p (drop those below min_p x the best one's
    probability), then softmax over what is left."""
    z = logits.astype(np.float64) / temperature
    keep = np.ones_like(z, bool)
    order = np.argsort(-z, kind="stable")
    if top_k > 0:
        keep[order[top_k:]] = False
    if top_p < 1.0:
        p = np.exp(z - z.max()) * keep
        p /= p.sum()
        ascending = order[::-1]
        cum = np.cumsum(p[ascending])
        keep[ascending[cum <= 1 - top_p]] = False
    if min_p > 0:
        p = np.exp(z - z.max())
        keep &= p >= min_p * p.max()
    q = np.exp(z - z.max()) * keep
    return q / q.sum()


def _tv_bound(p: np.ndarray, n: int, delta: float = 1e-6) -> float:
    """A total-variation distance a correct sampler exceeds with probability < delta: the mean
    of TV is at most 1/2 sum sqrt(p (1 - p) / n) (Jensen per token), and one draw moves TV by at
    most 1/n, so by McDiarmid P(TV >= mean + t) <= exp(-2 n t^2)."""
    return 0.5 * float(np.sum(np.sqrt(p * (1 - p) / n))) + math.sqrt(math.log(1 / delta) / (2 * n))


@pytest.fixture(scope="module")
def smollm2_logits(hf_smollm2):
    tok, model = hf_smollm2
    with torch.no_grad():
        return model(torch.tensor([tok.encode("My favourite colour is")])).logits[0, -1].numpy()


@pytest.mark.xdist_group("hf_smollm2")  # with the other tests of HF's SmolLM2 (loaded once per process)
@pytest.mark.parametrize("kw", [dict(temperature=0.8, top_p=0.9), pytest.param(dict(top_k=20), marks=pytest.mark.slow),
                                pytest.param(dict(min_p=0.1), marks=pytest.mark.slow)],
                         ids=["T0.8-top_p0.9", "top_k20", "min_p0.1"])  # two in `make test-slow`
def test_first_token_draws_follow_the_exact_distribution(smollm2_logits, kw):
    n, chunk = 4000, 500
    want = _exact(smollm2_logits, **kw)
    sample = jax.jit(sampling.sample)
    draws = []
    for start in range(0, n, chunk):
        params = sampling.SamplingInputs.build([SamplingParams(**kw)] * chunk, list(range(start, start + chunk)),
                                               chunk, vocab=len(smollm2_logits), stop_slots=1)
        logits = jnp.broadcast_to(jnp.asarray(smollm2_logits), (chunk, len(smollm2_logits)))
        draws.append(np.asarray(sample(logits, params, jnp.full((chunk,), 7, jnp.int32))[0]))
    freq = np.bincount(np.concatenate(draws), minlength=len(want)) / n
    assert freq[want == 0].sum() == 0, "a token outside the allowed set was drawn"
    tv, bound = 0.5 * np.abs(freq - want).sum(), _tv_bound(want, n)
    assert tv < bound, (tv, bound)
    # The bound has teeth: ignoring temperature or the cut-off puts these draws far outside it.
    wrong = _exact(smollm2_logits, **{**kw, "temperature": 1.3})
    assert 0.5 * np.abs(freq - wrong).sum() > _tv_bound(wrong, n)


# -- structured output ----------------------------------------------------------------------------

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "address": {"type": "object", "properties": {
                                          "city": {"type": "string", "maxLength": 6},
                                          "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
                                          "required": ["city", "zip"], "additionalProperties": False}},
     "required": ["name", "address"], "additionalProperties": False},  # nested objects
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},  # arrays
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                      "size": {"enum": [1, 2, 3]}},
     "required": ["colour", "size"], "additionalProperties": False},  # enums
    {"type": "object", "properties": {"t": {"type": "number", "minimum": -5, "maximum": 5},
                                      "n": {"type": "integer", "exclusiveMinimum": 10, "maximum": 20}},
     "required": ["t", "n"], "additionalProperties": False},  # numbers with bounds
    {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": ["null", "integer"], "maximum": 9},
                                      "c": {"type": "string", "maxLength": 3}},
     "required": ["a", "b"], "additionalProperties": False},  # required and optional fields
]


@pytest.mark.parametrize("schema", range(len(SCHEMAS)), ids=["nested", "array", "enum", "bounds", "required"])
def test_json_schema_outputs_parse_and_validate(looped, schema):
    import json

    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[schema]}}
    params = [SamplingParams(temperature=1.0, seed=s, max_new_tokens=100, response_format=fmt) for s in range(20)]
    outs = looped.generate_outputs(["{"] * 20, sampling_params=params, use_tqdm=False)
    finished = [o for o in outs if o.finish_reason == "stop"]
    assert len(finished) >= 18, [o.text for o in outs if o.finish_reason != "stop"]
    for o in finished:
        jsonschema.validate(json.loads(o.text), SCHEMAS[schema])
    assert len({o.text for o in finished}) > 1  # seeded samples, not one forced string


def test_regex_choice_and_grammar_outputs_match_and_free_rows_are_unchanged(looped):
    import re

    free = SamplingParams(temperature=1.0, seed=3, max_new_tokens=12, ignore_eos=True)
    alone = looped.generate_outputs([PROMPT], sampling_params=free, use_tqdm=False)[0].token_ids
    formats = [{"type": "regex", "regex": r"[a-f]{3}-\d{2,4}"},
               {"type": "choice", "choices": ["yes", "no", "maybe so"]},
               {"type": "grammar", "grammar": 'start: "(" num ("+" num)* ")"\nnum: /[1-9]/'},
               {"type": "grammar", "grammar": 'root ::= "<" [xyz]+ ">"'}]  # GBNF
    params = [free] + [SamplingParams(temperature=1.0, seed=s, max_new_tokens=24, response_format=f)
                       for s, f in enumerate(formats)]
    outs = looped.generate_outputs([PROMPT] * 5, sampling_params=params, use_tqdm=False)
    assert outs[0].token_ids == alone  # a free row in a constrained batch draws what it draws alone
    assert re.fullmatch(r"[a-f]{3}-\d{2,4}", outs[1].text), outs[1].text
    assert outs[2].text in ("yes", "no", "maybe so") and outs[2].finish_reason == "stop"
    assert re.fullmatch(r"\([1-9](\+[1-9])*\)", outs[3].text) or outs[3].finish_reason == "length", outs[3].text
    assert re.fullmatch(r"<[xyz]+>", outs[4].text) or outs[4].finish_reason == "length", outs[4].text


@pytest.mark.parametrize("fmt,message", [
    ({"type": "json_schema", "json_schema": {"schema": {"type": "object", "if": {"required": ["a"]}}}},
     'not supported: Unimplemented keys: \\["if"\\]'),
    ({"type": "regex", "regex": "(unclosed"}, "response_format"),
    ({"type": "grammar", "grammar": "start: missing_rule"}, "response_format"),
])
def test_formats_the_engine_cannot_compile_fail_alone(looped, fmt, message):
    bad = SamplingParams(max_new_tokens=4, response_format=fmt)
    with pytest.raises(RequestError, match=message):
        looped.generate_outputs([PROMPT], sampling_params=bad, use_tqdm=False)
    assert len(looped.generate_outputs([PROMPT], max_new_tokens=4, use_tqdm=False)[0].token_ids) == 4


@pytest.mark.parametrize("fmt,message", [
    ({"type": "xml"}, "response_format must be a dict whose 'type' is one of"),
    ({"type": "json_schema", "json_schema": {"type": "object"}}, "the schema goes under json_schema.schema"),
    ({"type": "regex"}, "needs a 'regex' field"),
    ({"type": "choice", "choices": []}, "choices must be a non-empty list"),
])
def test_bad_response_format_shapes_are_clear_errors(fmt, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams(response_format=fmt)
