"""compute_log_probabilities against HF's log-softmax (top-5, with and without echo)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import build_model, held, random_prompt
from maxlike.pipelines.context import TextContext


def test_log_probabilities_match_hf(tiny_models):
    path, hf = tiny_models["llama"]
    model = build_model(path, return_logits="all")
    prompts = [random_prompt(n, seed=n) for n in (7, 12)]
    ctxs = [held(model, TextContext(f"lp{i}", p, len(p) + 4)) for i, p in enumerate(prompts)]
    inputs = model.prepare_initial_token_inputs([ctxs])
    out = model.execute(inputs)
    sampled = jnp.argmax(out.next_token_logits, axis=-1).astype(jnp.int32)
    top_n, echo = [5, 5], [False, True]
    results = model.compute_log_probabilities(model.session, inputs, out, sampled, top_n, echo)
    for i, (prompt, res) in enumerate(zip(prompts, results)):
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor(prompt[None], dtype=torch.long)).logits[0], -1).numpy()
        tok = int(sampled[i])
        # Without echo: one entry, for the sampled token. With echo: one per prompt token,
        # the log-prob of the token after it (the sampled one after the last).
        rows = ref[-1:] if not echo[i] else ref
        targets = [tok] if not echo[i] else list(prompt[1:]) + [tok]
        assert len(res.token_log_probabilities) == len(rows)
        for row, target, lp, top in zip(rows, targets, res.token_log_probabilities, res.top_log_probabilities):
            assert abs(lp - row[target]) < 1e-4
            best = np.argsort(-row)[:5]
            assert set(best) <= set(top), "the top-5 tokens are all present"
            assert target in top, "the chosen token is always present"
            for t in best:
                assert abs(top[int(t)] - row[t]) < 1e-4
    # top_n == 0 skips the row
    assert model.compute_log_probabilities(model.session, inputs, out, sampled, [0, 3], [False, False])[0] is None


def test_logprobs_through_the_pipeline(tiny_llm):
    from maxlike.interfaces import SamplingParams

    out = tiny_llm.generate_outputs(["hello"], max_new_tokens=4, sampling_params=SamplingParams(top_k=1, logprobs=3),
                                    use_tqdm=False)[0]
    assert len(out.log_probabilities) == len(out.token_ids)
    for step, tok in zip(out.log_probabilities, out.token_ids):
        assert tok in step.top_log_probabilities[0]
        assert max(step.top_log_probabilities[0].values()) == step.token_log_probabilities[0]  # greedy = argmax


def _echo_llm(path, **kw):
    from maxlike.entrypoints import LLM
    from maxlike.pipelines import PipelineConfig

    kw = {"max_length": 128, "max_batch_size": 4, **kw}
    return LLM(PipelineConfig(model_path=path, enable_echo=True, **kw), progress=False)


def _echo_params(new=4):
    from maxlike.interfaces import SamplingParams

    return SamplingParams(top_k=1, max_new_tokens=new, logprobs=2, echo=True, ignore_eos=True)


def test_echo_covers_the_whole_prompt_even_on_a_prefix_cache_hit(tiny_models):
    path, hf = tiny_models["llama"]
    llm = _echo_llm(path, enable_prefix_caching=True)
    prompt = random_prompt(110, seed=3).tolist()
    first, second = (llm.generate_outputs([prompt], sampling_params=_echo_params(), use_tqdm=False)[0]
                     for _ in range(2))
    with torch.no_grad():  # HF's log-softmax over prompt + generated tokens
        ref = torch.log_softmax(hf(torch.tensor([prompt + first.token_ids[:-1]])).logits[0], -1).numpy()
    targets = prompt[1:] + first.token_ids
    for out in (first, second):
        lps = [lp for step in out.log_probabilities for lp in step.token_log_probabilities]
        assert len(lps) == 110 + 4 - 1, "one per prompt token (the token after it), then one per new token"
        np.testing.assert_allclose(lps, ref[np.arange(len(targets)), targets], atol=1e-4)
    assert llm.pipeline.model.kv_manager.prefix_cache.stats.hit_tokens == 0, "echo requests compute their prompt"
    plain = llm.generate_outputs([prompt], sampling_params=_echo_params().replace(echo=False), use_tqdm=False)[0]
    assert llm.pipeline.model.kv_manager.prefix_cache.stats.hit_tokens > 0, "others still use the cache"
    assert plain.token_ids == first.token_ids


@pytest.mark.slow  # about 20 s: `make test-slow`
def test_echo_is_not_repeated_after_a_preemption(tiny_llama):
    from maxlike.interfaces import SamplingParams

    page_bytes = 2 * 2 * 16 * 2 * 16 * 4  # K+V x layers x page tokens x kv heads x head dim x fp32
    small = _echo_llm(tiny_llama[0], max_batch_size=8, host_kv_cache_memory_gib=(12 + 1.5) * page_bytes / 2**30,
                      max_num_steps=4)
    preempted = []
    original = small.scheduler._preempt
    small.scheduler._preempt = lambda row: (preempted.append(row.ctx.request_id), original(row))[1]
    prompts = [random_prompt(40, seed=i).tolist() for i in range(4)]
    params = [SamplingParams(top_k=1, max_new_tokens=60, ignore_eos=True)] * 3 + [_echo_params(new=60)]
    outs = small.generate_outputs(prompts, sampling_params=params, use_tqdm=False)
    echo_id = outs[3].request_id
    assert echo_id in preempted, "the echo request (the newest) was preempted and recomputed"
    alone = _echo_llm(tiny_llama[0]).generate_outputs([prompts[3]], sampling_params=_echo_params(new=60),
                                                      use_tqdm=False)[0]
    got = [lp for step in outs[3].log_probabilities for lp in step.token_log_probabilities]
    want = [lp for step in alone.log_probabilities for lp in step.token_log_probabilities]
    assert len(got) == len(want) == 40 + 60 - 1
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_echo_without_enable_echo_fails_alone_at_admission(tiny_llm):
    from maxlike.interfaces import RequestError, SamplingParams, TextGenerationRequest

    sched = tiny_llm.scheduler
    ok = [sched.add(TextGenerationRequest(f"fine{i}", prompt="hello", sampling_params=SamplingParams(
        top_k=1, max_new_tokens=5))) for i in range(2)]
    sched.step()
    with pytest.raises(RequestError, match="echo with logprobs needs the prompt's logits: load the model with "
                                           "enable_echo=True"):
        sched.add(TextGenerationRequest("echo", prompt="hello", sampling_params=_echo_params()))
    while sched.has_work:
        sched.step()
    assert all(r.done and len(r.ctx.generated) == 5 for r in ok)


@pytest.mark.parametrize("mode", ["raw_logprobs", pytest.param("processed_logprobs", marks=pytest.mark.slow)])
def test_every_logprob_and_echo_executable_is_warm(tiny_llama, mode):
    from maxlike.interfaces import SamplingParams

    llm = _echo_llm(tiny_llama[0], max_batch_size=2, max_length=32, warmup=True, forbid_compile=True,
                    logprobs_mode=mode)
    stats = llm.pipeline.model.session.stats
    warm = stats.compiled + stats.loaded
    params = [SamplingParams(top_k=1 if n < 6 else 40, temperature=0.8, max_new_tokens=3, logprobs=n,
                             echo=n % 2 == 1) for n in (1, 3, 6, 20)]
    outs = llm.generate_outputs([random_prompt(n, seed=n).tolist() for n in (5, 20, 17, 9)], sampling_params=params,
                                use_tqdm=False)
    assert stats.compiled + stats.loaded == warm, "no compile after warm-up"
    assert [len(o.log_probabilities[-1].top_log_probabilities[0]) for o in outs][0] in (1, 2)
    assert len(outs[1].log_probabilities[0].token_log_probabilities) == 20  # echo: the whole prompt


@pytest.mark.parametrize("mode", ["processed_logprobs", pytest.param("processed_logits", marks=pytest.mark.slow),
                                  pytest.param("raw_logits", marks=pytest.mark.slow)])
def test_logprobs_mode_against_hf_logits_processors(tiny_models, mode):
    """Each step's values against HF: the model's logits through HF's own processors and warpers,
    log-softmaxed unless the mode asks for logits. One batch: a row cut by top-p inside its top-k,
    one by min-p (with a logit bias), and a greedy row that gets its repetition penalty alone."""
    from transformers.generation import logits_process as hp

    from maxlike.entrypoints import LLM
    from maxlike.interfaces import SamplingParams
    from maxlike.pipelines import PipelineConfig

    path, hf = tiny_models["llama"]
    llm = LLM(PipelineConfig(model_path=path, max_length=64, max_batch_size=3, dtype="float32", logprobs_mode=mode),
              progress=False)
    common = dict(max_new_tokens=6, logprobs=20, ignore_eos=True)
    rows = [  # (params, HF's chain for the processed modes); the tiny model's distribution is nearly flat
        (SamplingParams(temperature=0.7, top_k=12, top_p=0.5, repetition_penalty=1.3, seed=5, **common),
         [hp.RepetitionPenaltyLogitsProcessor(1.3), hp.TemperatureLogitsWarper(0.7), hp.TopKLogitsWarper(12),
          hp.TopPLogitsWarper(0.5)]),
        (SamplingParams(temperature=0.3, min_p=0.8, logit_bias={7: 2.0}, seed=6, **common),
         [hp.SequenceBiasLogitsProcessor([[[7], 2.0]]), hp.TemperatureLogitsWarper(0.3), hp.MinPLogitsWarper(0.8)]),
        (SamplingParams(top_k=1, repetition_penalty=1.3, **{**common, "logprobs": 5}),
         [hp.RepetitionPenaltyLogitsProcessor(1.3)]),
    ]
    prompts = [random_prompt(n, seed=n).tolist() for n in (9, 6, 7)]
    outs = llm.generate_outputs(prompts, sampling_params=[p for p, _ in rows], use_tqdm=False)
    processed = mode.startswith("processed")
    for prompt, out, (params, chain) in zip(prompts, outs, rows):
        assert len(out.log_probabilities) == len(out.token_ids) == 6
        excluded = 0
        for step, (tok, lp) in enumerate(zip(out.token_ids, out.log_probabilities)):
            ids = torch.tensor([prompt + out.token_ids[:step]])
            with torch.no_grad():
                scores = hp.LogitsProcessorList(chain if processed else [])(ids, hf(ids).logits[:, -1].float())
            ref = (scores if mode.endswith("_logits") else torch.log_softmax(scores, -1))[0].numpy()
            assert np.isfinite(ref[tok]), "the drawn token is in the distribution it was drawn from"
            assert abs(lp.token_log_probabilities[0] - ref[tok]) < 1e-4
            top = lp.top_log_probabilities[0]
            finite = {t: v for t, v in top.items() if np.isfinite(v)}
            best = [int(t) for t in np.argsort(-ref, kind="stable")[:params.logprobs] if np.isfinite(ref[t])]
            assert set(finite) == set(best) | {tok}
            np.testing.assert_allclose([finite[t] for t in best], ref[best], atol=1e-4)
            assert all(v == -np.inf for v in top.values() if not np.isfinite(v))
            excluded += len(top) - len(finite)
        assert (excluded > 0) == (processed and not params.greedy), "top-20 reaches past the kept tokens"


def test_logprobs_mode_is_checked(tiny_llama):
    from maxlike.config import ConfigError
    from maxlike.pipelines import PipelineConfig

    with pytest.raises(ConfigError, match="logprobs_mode='processed': use one of raw_logprobs, raw_logits, "
                                          "processed_logprobs, processed_logits"):
        PipelineConfig(model_path=tiny_llama[0], logprobs_mode="processed")
