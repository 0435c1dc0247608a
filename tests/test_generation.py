"""TextGenerationPipeline and sampling: greedy, seeds, top-k/top-p, stops, multi-step, streaming."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from maxlike.entrypoints import LLM
from maxlike.interfaces import SamplingParams
from maxlike.pipelines import PipelineConfig, sampling


def _sample(logits, **kw):
    params = [SamplingParams(**kw)] * logits.shape[0]
    inputs = sampling.SamplingInputs.build(params, list(range(logits.shape[0])), logits.shape[0])
    return np.asarray(sampling.sample(jnp.asarray(logits), inputs, jnp.arange(logits.shape[0])))


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
