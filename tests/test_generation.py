"""TextGenerationPipeline and sampling: greedy, seeds, top-k/top-p, stops, multi-step, streaming."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlike.entrypoints import LLM
from maxlike.interfaces import SamplingParams
from maxlike.pipelines import PipelineConfig, sampling

SAMPLE = jax.jit(sampling.sample)  # (eager, every call would trace the sampler's branches again)


def _sample(logits, **kw):
    params = [SamplingParams(**kw)] * logits.shape[0]
    inputs = sampling.SamplingInputs.build(params, list(range(logits.shape[0])), logits.shape[0],
                                           vocab=logits.shape[1], stop_slots=1)
    return np.asarray(SAMPLE(jnp.asarray(logits), inputs, jnp.arange(logits.shape[0]))[0])


def test_top_k_and_top_p_restrict_the_draw():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 256, np.float32))
    assert set(_sample(logits, top_k=2)) <= {0, 1}
    assert set(_sample(logits, top_k=2)) == {0, 1}  # 256 draws see both
    assert set(_sample(logits, top_p=0.7)) == {0, 1}  # 0.5 + 0.3 covers 0.7
    assert set(_sample(logits, top_p=0.01)) == {0}
    assert set(_sample(logits, temperature=0.0)) == {0}
    assert set(_sample(logits)) == {0, 1, 2, 3}


def test_greedy_forms_agree(tiny_llm):
    prompts = ["the cat", "a dog ran"]
    greedy = tiny_llm.generate(prompts, max_new_tokens=8, use_tqdm=False)
    assert tiny_llm.generate(prompts, max_new_tokens=8, sampling_params=SamplingParams(temperature=0.0),
                             use_tqdm=False) == greedy
    assert tiny_llm.generate(prompts, max_new_tokens=8, sampling_params=SamplingParams(top_k=1, temperature=0.7),
                             use_tqdm=False) == greedy


def test_seeded_sampling_is_reproducible_and_batch_invariant(tiny_llm):
    p = [SamplingParams(temperature=1.0, seed=s, max_new_tokens=10, ignore_eos=True) for s in (1, 2)]
    both = tiny_llm.generate_outputs(["hello", "hello"], sampling_params=p, use_tqdm=False)
    assert both[0].token_ids != both[1].token_ids, "different seeds draw differently"
    alone = tiny_llm.generate_outputs(["hello"], sampling_params=[p[1]], use_tqdm=False)[0]
    assert alone.token_ids == both[1].token_ids, "a seed draws the same tokens alone or in a batch"


def test_stops_at_stop_tokens_and_max_new_tokens(tiny_llm):
    free = tiny_llm.generate_outputs(["stop here"], max_new_tokens=12,
                                     sampling_params=SamplingParams(top_k=1, ignore_eos=True), use_tqdm=False)[0]
    assert len(free.token_ids) == 12 and free.finish_reason == "length"
    stop = free.token_ids[4]
    first = free.token_ids.index(stop)
    out = tiny_llm.generate_outputs(["stop here"], max_new_tokens=12, use_tqdm=False,
                                    sampling_params=SamplingParams(top_k=1, stop_token_ids=(stop,), ignore_eos=True))[0]
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop"


def test_multi_step_decode_matches_single_step(tiny_llama):
    """The on-device decode loop (greedy and sampled rows, per-row stop ids) gives
    the tokens of one step per call, and ends as soon as every row has finished."""
    def llm(steps):
        return LLM(PipelineConfig(model_path=tiny_llama[0], max_length=128, max_batch_size=4, max_num_steps=steps),
                   progress=False)

    single, multi = llm(1), llm(8)
    free = single.generate_outputs(["one"], max_new_tokens=11, use_tqdm=False,
                                   sampling_params=SamplingParams(top_k=1, ignore_eos=True))[0].token_ids
    stop = free[3] if free[3] not in free[:3] else free[0]
    prompts = ["one", "two three four", "five six"]
    params = [SamplingParams(top_k=1, stop_token_ids=(stop,), ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=20, seed=7, ignore_eos=True),
              SamplingParams(top_k=1, ignore_eos=True)]
    outs = [m.generate_outputs(prompts, max_new_tokens=11, use_tqdm=False, sampling_params=params)
            for m in (single, multi)]
    assert [o.token_ids for o in outs[0]] == [o.token_ids for o in outs[1]]
    assert outs[1][0].finish_reason == "stop" and outs[1][0].token_ids[-1] == stop
    assert [len(o.token_ids) for o in outs[1][1:]] == [11, 11]
    assert multi.pipeline.model.session.stats.by_name.get("decode_loop", 0) >= 1

    # Alone, the stopping row ends the loop early: only the steps up to its stop token run.
    multi.scheduler.stats.decode_steps = 0
    out = multi.generate_outputs(["one"], max_new_tokens=11, use_tqdm=False, sampling_params=params[0])[0]
    assert out.token_ids == free[: free.index(stop) + 1]
    assert multi.scheduler.stats.decode_steps == free.index(stop)  # the prefill made the first token


@pytest.mark.slow  # about 13 s: `make test-slow`
def test_width_buckets_and_width_on_device_decode_alike(tiny_llama, monkeypatch):
    """The two decode layouts (GPU: one executable per power-of-two page-table width; elsewhere a
    full-width table whose read prefix attention picks on device) give the same tokens for rows
    whose contexts cross several pages and widths, with the bucket counts the formula says."""
    import graphs.attention

    def run():
        llm = LLM(PipelineConfig(model_path=tiny_llama[0], max_length=64, max_batch_size=2, kv_cache_page_size=4,
                                 max_num_steps=4, executable_cache=False, dtype="float32"), progress=False)
        outs = llm.generate_outputs(["one", "two three four five six"], max_new_tokens=24, use_tqdm=False,
                                    sampling_params=[SamplingParams(top_k=1, ignore_eos=True),
                                                     SamplingParams(temperature=0.8, seed=3, ignore_eos=True)])
        model = llm.pipeline.model
        decode = sorted({b.width for b in model.step_buckets() if b.tokens == 1})
        return [o.token_ids for o in outs], decode, model.executable_counts(4)["decode_loop"]

    on_device = run()
    monkeypatch.setitem(graphs.attention.WIDTH_ON_DEVICE, "cpu", False)  # the GPU layout, here
    buckets = run()
    assert on_device[0] == buckets[0] and all(len(t) == 24 for t in on_device[0])
    assert on_device[1] == [16] and buckets[1] == [1, 2, 4, 8, 16]  # 64 tokens in pages of 4
    assert (on_device[2], buckets[2]) == (2, 10)  # batch buckets 1, 2 x widths


def test_more_prompts_than_the_batch_and_chat(tiny_llm):
    prompts = [f"prompt number {i}" for i in range(9)]  # max_batch_size is 4
    batched = tiny_llm.generate(prompts, max_new_tokens=5, use_tqdm=False)
    assert batched == [tiny_llm.generate([p], max_new_tokens=5, use_tqdm=False)[0] for p in prompts]
    chat = tiny_llm.generate_outputs(["hi"], max_new_tokens=3, chat=True, use_tqdm=False)[0]
    assert chat.prompt_token_ids == tiny_llm.tokenizer.encode("<s>user: hi\n<s>assistant:")


def test_stream_yields_the_whole_text(tiny_llm):
    from maxlike.interfaces import TextGenerationRequest

    params = SamplingParams(top_k=1, max_new_tokens=10)
    pieces = list(tiny_llm.stream(TextGenerationRequest("s", prompt="streaming", sampling_params=params)))
    assert "".join(pieces) == tiny_llm.generate(["streaming"], max_new_tokens=10, use_tqdm=False)[0]


def _draws(logits_row: np.ndarray, n: int, **kw) -> np.ndarray:
    """`n` draws from one row of logits, each with its own seed, in one batch."""
    logits = np.repeat(logits_row[None], n, axis=0).astype(np.float32)
    params = sampling.SamplingInputs.build([SamplingParams(**kw)] * n, list(range(n)), n, vocab=logits.shape[1],
                                           stop_slots=1)
    return np.asarray(SAMPLE(jnp.asarray(logits), params, jnp.zeros(n, jnp.int32))[0])


def _expected(logits_row, top_k=-1, top_p=1.0, temperature=1.0):
    """The distribution written out: softmax(logits / T), cut to the top k, then to the smallest
    prefix whose mass (before each token) stays below top_p, renormalised."""
    z = logits_row / temperature
    order = np.argsort(-z)
    p = np.exp(z[order] - z.max())
    if top_k > 0:
        p[top_k:] = 0
    p /= p.sum()
    before = np.cumsum(p) - p
    p[before >= top_p] = 0
    out = np.zeros_like(p)
    out[order] = p / p.sum()
    return out


@pytest.mark.parametrize("kw", [{}, {"top_k": 3}, {"top_p": 0.8}, {"top_k": 4, "top_p": 0.7},
                                {"temperature": 0.5, "top_p": 0.9}, {"top_k": 300}])
def test_draws_follow_the_written_out_distribution(kw):
    rng = np.random.default_rng(1)
    row = np.full(400, -30.0)  # 400 tokens, 8 of them likely: the rest must never be drawn
    row[rng.choice(400, 8, replace=False)] = rng.normal(size=8) * 1.5
    n = 6000
    freq = np.bincount(_draws(row, n, **kw), minlength=400) / n
    want = _expected(row, **kw)
    assert np.abs(freq - want).max() < 0.025, (np.round(freq[want > 0], 3), np.round(want[want > 0], 3))
    assert freq[want == 0].sum() == 0


def test_a_row_draws_the_same_token_whatever_its_batch_needs():
    """The sampler sorts the vocabulary only when a row needs it; a top-k row draws the same
    token whether or not another row in its batch forces the sort."""
    rng = np.random.default_rng(2)
    vocab = 1000
    logits = rng.normal(size=(2, vocab)).astype(np.float32) * 2
    topk = SamplingParams(top_k=20)
    for seed in range(20):
        for other in (SamplingParams(top_k=20), SamplingParams(top_k=900), SamplingParams(top_p=0.999),
                      SamplingParams(temperature=0.0), SamplingParams()):
            params = sampling.SamplingInputs.build([topk, other], [seed, 99], 2, vocab=vocab, stop_slots=1)
            got = np.asarray(SAMPLE(jnp.asarray(logits), params, jnp.asarray([7, 7]))[0])
            alone = np.asarray(SAMPLE(jnp.asarray(logits[:1]), sampling.SamplingInputs.build(
                [topk], [seed], 1, vocab=vocab, stop_slots=1), jnp.asarray([7]))[0])
            assert got[0] == alone[0], (seed, other)


def test_streaming_feeds_each_token_to_the_detokenizer_once(tiny_llm, monkeypatch):
    from maxlike.interfaces import TextGenerationRequest
    from maxlike.pipelines.detokenize import IncrementalDetokenizer

    fed = []
    original = IncrementalDetokenizer.step
    monkeypatch.setattr(IncrementalDetokenizer, "step", lambda self, ids: (fed.append(len(ids)), original(self, ids))[1])
    params = SamplingParams(temperature=1.0, seed=5, max_new_tokens=60, ignore_eos=True)
    pieces = list(tiny_llm.stream(TextGenerationRequest("inc", prompt="bytes", sampling_params=params)))
    expect = tiny_llm.generate_outputs(["bytes"], sampling_params=params, use_tqdm=False)[0]
    assert "".join(pieces) == expect.text
    assert sum(fed) == len(expect.token_ids) == 60, "every token decoded once, none again"


def test_sort_free_masks_equal_a_stable_sort_with_ties():
    """The bisection masks against a stable sort written out in numpy: the k best (ties to the lower
    id), then the prefix whose mass before each token stays below top_p, on logits full of ties."""
    rng = np.random.default_rng(5)
    b, n = 6, 300
    x = rng.integers(-6, 4, size=(b, n)).astype(np.float32) * 0.75  # ten values: runs of equal logits
    x[0, :] = 1.0  # one row all tied
    x[1, 5] = -np.inf
    k = np.array([1, 7, 40, 300, 123, 2], np.int32)
    top_p = np.array([0.5, 0.9, 0.3, 1.0, 0.75, 0.999], np.float32)
    keys = sampling._order_keys(jnp.asarray(x))
    in_k = np.asarray(jax.jit(sampling.top_k_mask)(keys, jnp.asarray(k)))
    lse = np.log(np.sum(np.where(in_k, np.exp(x.astype(np.float64)), 0), axis=-1))
    probs = np.exp(x - lse[:, None]).astype(np.float32)
    kept = np.asarray(jax.jit(sampling.nucleus_mask)(keys, jnp.asarray(probs), jnp.asarray(in_k), jnp.asarray(top_p)))
    for r in range(b):
        order = np.argsort(-x[r], kind="stable")  # equal logits: lower id first
        want_k = np.zeros(n, bool)
        want_k[order[: k[r]]] = True
        assert (in_k[r] == want_k).all(), r
        p = np.where(want_k, probs[r], 0)[order].astype(np.float64)
        before = np.cumsum(p) - p
        want = np.zeros(n, bool)
        want[order[(before < top_p[r]) & want_k[order]]] = True
        assert (kept[r] == want).all(), (r, np.flatnonzero(kept[r] != want))
