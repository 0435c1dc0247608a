"""Continuous batching: preemption under a small KV pool, chunked prefill, admission errors."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import random_prompt
from maxlike.entrypoints import LLM
from maxlike.interfaces import RequestError, SamplingParams, TextGenerationRequest
from maxlike.pipelines import PipelineConfig

PAGE_BYTES_TINY = 2 * 2 * 16 * 2 * 16 * 4  # K+V x layers x page tokens x kv heads x head dim x fp32


def small_pool_llm(path, pages: int, **kw) -> LLM:
    gib = (pages + 1.5) * PAGE_BYTES_TINY / 2**30  # usable pages + the null page
    return LLM(PipelineConfig(model_path=path, max_length=128, max_batch_size=8, host_kv_cache_memory_gib=gib, **kw),
               progress=False)


@pytest.mark.parametrize("caching,in_flight", [pytest.param(False, False, marks=pytest.mark.slow), (True, True)])
def test_many_requests_through_a_small_pool_equal_each_alone(tiny_llama, tiny_llm, caching, in_flight):
    rng = np.random.default_rng(0)
    shared = random_prompt(40, seed=99).tolist()  # some prompts share a prefix: hits, then eviction
    prompts = [(shared if i % 3 == 0 else []) + random_prompt(int(rng.integers(1, 60)), seed=i).tolist()
               for i in range(40)]
    params = [SamplingParams(top_k=1, ignore_eos=True, max_new_tokens=int(rng.integers(1, 30))) for _ in prompts]
    llm = small_pool_llm(tiny_llama[0], pages=24, max_num_steps=4,  # room for ~3 of 8 rows at full length
                         enable_prefix_caching=caching, async_scheduling=True, enable_in_flight_batching=in_flight)
    assert llm.pipeline.model.kv_manager.num_pages == 25
    outs = llm.generate_outputs(prompts, sampling_params=params, use_tqdm=False)
    stats = llm.scheduler.stats
    assert stats.preemptions > 0, "the pool was too small for the load"
    assert stats.overlapped > 0, "decode blocks were dispatched ahead of the host's commits"
    assert (stats.mixed_steps > 0) == in_flight
    for prompt, p, out in zip(prompts, params, outs):
        alone = tiny_llm.generate_outputs([prompt], sampling_params=[p], use_tqdm=False)[0]
        assert out.token_ids == alone.token_ids
        assert len(out.token_ids) == p.max_new_tokens
    kv = llm.pipeline.model.kv_manager
    assert kv.free_pages == kv.num_pages - 1, "every page came back"
    if caching:
        assert kv.prefix_cache.stats.hit_rate > 0


@pytest.mark.slow  # about 18 s: `make test-slow`
def test_async_scheduling_changes_only_the_timing(tiny_llama):
    """Dispatching each decode block before the last one's tokens are read gives the
    same tokens and finish reasons, with stops, sampling, preemption and prefix caching."""
    rng = np.random.default_rng(3)
    shared = random_prompt(33, seed=5).tolist()
    prompts = [(shared if i % 2 else []) + random_prompt(int(rng.integers(1, 50)), seed=100 + i).tolist()
               for i in range(24)]
    stops = tuple(int(t) for t in rng.choice(np.arange(3, 320), size=12, replace=False))
    params = [SamplingParams(top_k=1 if i % 3 else 40, temperature=0.9, seed=i, ignore_eos=True,
                             stop_token_ids=stops if i % 4 == 0 else (), max_new_tokens=int(rng.integers(1, 40)))
              for i in range(len(prompts))]
    results = []
    for overlap in (False, True):
        llm = small_pool_llm(tiny_llama[0], pages=20, max_num_steps=5, enable_prefix_caching=True,
                             async_scheduling=overlap)
        outs = llm.generate_outputs(prompts, sampling_params=params, use_tqdm=False)
        results.append([(o.token_ids, o.finish_reason) for o in outs])
        stats = llm.scheduler.stats
        assert (stats.overlapped > 0) == overlap
        if llm.pipeline.model.session.platform == "cpu":  # elsewhere the pool is sized from device memory
            assert stats.preemptions > 0
        kv = llm.pipeline.model.kv_manager
        assert kv.free_pages == kv.num_pages - 1 and not llm.scheduler.has_work
    assert results[0] == results[1]
    assert any(reason == "stop" for _, reason in results[0])


def test_chunked_prefill_gives_the_same_logits(tiny_llama):
    prompt = random_prompt(100, seed=7).tolist()
    params = SamplingParams(top_k=1, max_new_tokens=6, logprobs=5, ignore_eos=True)
    results = []
    for chunk in (8192, 16):
        llm = LLM(PipelineConfig(model_path=tiny_llama[0], max_length=128, max_batch_size=4, prefill_chunk_size=chunk),
                  progress=False)
        results.append(llm.generate_outputs([prompt], sampling_params=params, use_tqdm=False)[0])
        assert llm.scheduler.stats.prefill_steps == (1 if chunk > 100 else 7)
    whole, chunked = results
    assert whole.token_ids == chunked.token_ids
    for a, b in zip(whole.log_probabilities, chunked.log_probabilities):
        assert abs(a.token_log_probabilities[0] - b.token_log_probabilities[0]) < 1e-5
        for t, v in a.top_log_probabilities[0].items():
            assert abs(b.top_log_probabilities[0][t] - v) < 1e-5


def test_a_request_that_can_never_fit_is_rejected_alone(tiny_llama):
    llm = small_pool_llm(tiny_llama[0], pages=8)  # one max_length sequence
    sched = llm.scheduler
    ok = [sched.add(TextGenerationRequest(f"ok{i}", prompt="hello", sampling_params=SamplingParams(
        top_k=1, max_new_tokens=8))) for i in range(3)]
    with pytest.raises(RequestError, match=r"exceeds max_length \(128\)"):
        sched.add(TextGenerationRequest("long", prompt="x" * 100, sampling_params=SamplingParams(max_new_tokens=50)))
    with pytest.raises(RequestError, match="already in flight"):
        sched.add(TextGenerationRequest("ok1", prompt="again"))
    while sched.has_work:
        sched.step()
    assert all(r.done and len(r.ctx.generated) >= 1 for r in ok)


def test_prefix_caching_shares_a_system_prompt(tiny_llama):
    system = random_prompt(70, seed=11).tolist()  # 4 full pages of 16 tokens shared
    prompts = [system + random_prompt(int(n), seed=100 + i).tolist() for i, n in enumerate([3, 9, 20, 5, 12, 7])]
    params = SamplingParams(top_k=1, max_new_tokens=12, ignore_eos=True)
    runs = {}
    for caching in (False, True):
        llm = LLM(PipelineConfig(model_path=tiny_llama[0], max_length=128, max_batch_size=2,
                                 enable_prefix_caching=caching), progress=False)
        outs = llm.generate_outputs(prompts, sampling_params=params, use_tqdm=False)
        runs[caching] = ([o.token_ids for o in outs], llm.scheduler.stats.prefill_tokens, llm.pipeline.model.kv_manager)
    assert runs[True][0] == runs[False][0], "same outputs with and without prefix caching"
    assert runs[True][1] < runs[False][1], "fewer prefill tokens computed"
    kv = runs[True][2]
    assert kv.prefix_cache.stats.hit_rate > 0
    assert kv.pages_in_use == 0 and kv.free_pages == kv.num_pages - 1
    print(f"prefill tokens {runs[False][1]} -> {runs[True][1]}, hit rate {kv.prefix_cache.stats.hit_rate:.2f}")


@pytest.mark.parametrize("in_flight", [pytest.param(False, marks=pytest.mark.slow), True])  # False: test-slow
def test_forbid_compile_after_warmup_with_a_mixed_workload(tiny_llama, in_flight):
    from maxlike.engine.session import CompileForbiddenError

    llm = LLM(PipelineConfig(model_path=tiny_llama[0], max_length=64, max_batch_size=2, prefill_chunk_size=32,
                             max_num_steps=3, warmup=True, forbid_compile=True, enable_in_flight_batching=in_flight),
              progress=False)
    session = llm.pipeline.model.session
    warm = session.stats.compiled + session.stats.loaded  # (the suite shares one executable cache)
    buckets = llm.pipeline.model.step_buckets()
    decode = sum(1 for b in buckets if b.tokens == 1)
    assert sum(b.mixed for b in buckets) == (2 if in_flight else 0)  # 2 rows x chunks of 16 and 32
    # per bucket a step and an input unpacker; per batch size 2 samplers and 2 log-prob executables
    # (top-n buckets 5 and 20); per decode bucket prepare_next and one decode loop (greedy and sampled)
    assert warm == 2 * len(buckets) + 4 * 2 + 2 * decode  # batch sizes 1 and 2
    rng = np.random.default_rng(1)
    prompts, params = [], []
    for i in range(200):
        prompts.append(random_prompt(int(rng.integers(1, 55)), seed=i).tolist())
        greedy = i % 2 == 0
        max_new = int(rng.integers(1, 64 - len(prompts[-1]) + 1))
        extra = {}  # logit processors, min-p, stop strings and structured output ride the same executables
        if i % 3 == 1:
            extra = dict(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2,
                         logit_bias={7: 2.0}, min_new_tokens=min(3, max_new), min_p=0.05, stop=("ab",))
        elif i % 7 == 3:
            extra = dict(response_format={"type": "regex", "regex": "[a-z]+[0-9]"} if i % 2 else
                         {"type": "choice", "choices": ["yes", "no"]})
        params.append(SamplingParams(top_k=1 if greedy else int(rng.integers(0, 50)), temperature=0.9,
                                     top_p=float(rng.uniform(0.5, 1.0)), seed=i,
                                     logprobs=int(rng.integers(0, 21)) if i % 5 == 0 else 0,
                                     max_new_tokens=max_new, **extra))
    outs = llm.generate_outputs(prompts, sampling_params=params, use_tqdm=False)
    assert session.stats.compiled + session.stats.loaded == warm, "nothing compiled after warm-up"
    assert all(1 <= len(o.token_ids) <= p.max_new_tokens for o, p in zip(outs, params))
    for o, p in zip(outs, params):  # every top-n from 1 to 20 served by the warm buckets, cut to its n
        assert len(o.log_probabilities) == (len(o.token_ids) if p.logprobs else 0)
        assert all(p.logprobs <= len(lp.top_log_probabilities[0]) <= p.logprobs + 1 for lp in o.log_probabilities)
    assert (llm.scheduler.stats.mixed_steps > 0) == in_flight
    with pytest.raises(CompileForbiddenError, match="after warm-up"):
        session.compile("other", lambda x: x + 1, (np.zeros(3),))


def test_abort_frees_a_request_wherever_it_is(tiny_llama, tiny_llm):
    """Aborting a running request (its decode block possibly still on the device) and a waiting one
    frees their pages at once; the others finish with the tokens they would have had alone."""
    prompts = [random_prompt(5 + 3 * i, seed=200 + i).tolist() for i in range(10)]
    params = SamplingParams(top_k=1, ignore_eos=True, max_new_tokens=20)
    llm = small_pool_llm(tiny_llama[0], pages=60, max_num_steps=4, async_scheduling=True)
    sched, kv = llm.scheduler, llm.pipeline.model.kv_manager
    rows = [sched.add(TextGenerationRequest(f"r{i}", prompt=p, sampling_params=params)) for i, p in enumerate(prompts)]
    while not any(len(r.ctx.generated) >= 2 for r in rows[:8]):
        sched.step()
    assert len(sched.running) == 8 and len(sched.waiting) == 2
    assert sched.abort("r1") and sched.abort("r9")
    assert not sched.abort("r1") and not sched.abort("unknown")
    assert "r1" not in kv.requests() and "r9" not in kv.requests()
    assert rows[1].finish_reason == "abort" and rows[9] not in sched.waiting
    while sched.has_work:
        sched.step()
    for i in (0, 2, 3, 4, 5, 6, 7, 8):
        alone = tiny_llm.generate_outputs([prompts[i]], sampling_params=[params], use_tqdm=False)[0]
        assert rows[i].ctx.generated.tolist() == alone.token_ids
    assert len(rows[1].ctx.generated) < 20 and len(rows[9].ctx.generated) == 0
    assert kv.free_pages == kv.num_pages - 1 and kv.requests() == []


@pytest.mark.parametrize("in_flight", [False, True])
def test_a_long_prefill_does_not_stall_running_streams(tiny_llama, in_flight):
    """While a long prompt is prefilled chunk by chunk, the running request gets a token between
    chunks, or with in-flight batching in the same step as each chunk."""
    llm = small_pool_llm(tiny_llama[0], pages=60, prefill_chunk_size=16, enable_in_flight_batching=in_flight)
    sched = llm.scheduler
    params = SamplingParams(top_k=1, ignore_eos=True, max_new_tokens=40)
    a = sched.add(TextGenerationRequest("a", prompt=random_prompt(4, seed=1).tolist(), sampling_params=params))
    while len(a.ctx.generated) < 2:
        sched.step()
    b = sched.add(TextGenerationRequest("b", prompt=random_prompt(96, seed=2).tolist(),
                                        sampling_params=params.replace(max_new_tokens=8)))
    progress = []
    while b.ctx.pending > 1 or not b.ctx.generated.size:
        before = (len(a.ctx.generated), b.ctx.cache_length)
        sched.step()
        progress.append((len(a.ctx.generated) - before[0], b.ctx.cache_length - before[1]))
    chunks = sum(1 for _, db in progress if db > 0)
    assert chunks >= 5, progress  # 96 tokens in chunks of 16
    if in_flight:
        assert all(da == 1 for da, db in progress if db > 0), progress  # a token with every chunk
        assert len(progress) == chunks and llm.scheduler.stats.mixed_steps == chunks
    else:
        assert sum(da for da, _ in progress) >= chunks - 1, progress  # a decode step between every two chunks
    while sched.has_work:
        sched.step()
    assert len(a.ctx.generated) == 40 and len(b.ctx.generated) == 8
