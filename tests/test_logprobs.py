"""compute_log_probabilities against HF's log-softmax (top-5, with and without echo)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch

from conftest import build_model, random_prompt
from maxlike.pipelines.context import TextContext


def test_log_probabilities_match_hf(tiny_models):
    path, hf = tiny_models["llama"]
    model = build_model(path, return_logits="all")
    prompts = [random_prompt(n, seed=n) for n in (7, 12)]
    ctxs = [TextContext(f"lp{i}", p, len(p) + 4) for i, p in enumerate(prompts)]
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
