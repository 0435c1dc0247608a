"""The real model: SmolLM2-135M-Instruct (Q4_1 GGUF) against HF transformers on the same file."""

from __future__ import annotations

import pytest
import torch

PROMPTS = [  # (text, chat-templated?)
    ("What is the capital of France?", True),
    ("Write a haiku about the sea.", True),
    ("Explain gravity to a child in two sentences.", True),
    ("The quick brown fox", False),
    ("def fibonacci(n):", False),
    ("Once upon a time, in a land far away,", False),
]
NEW_TOKENS = 32
pytestmark = pytest.mark.xdist_group("hf_smollm2")  # `make test`'s processes load HF's SmolLM2 once between them


@pytest.fixture(scope="module")
def hf_reference(hf_smollm2):
    """(prompt, chat?) -> (prompt ids, HF's greedy tokens), computed once for both loop forms."""
    tok, hf = hf_smollm2
    out = {}
    for prompt, chat in PROMPTS:
        if chat:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"]
        else:
            ids = tok.encode(prompt)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids):].tolist()
        out[prompt, chat] = list(ids), ref
    return out


# The fast suite runs the layers as one loop (19 s against 68 unrolled: 30 layers compile once); every
# tiny-model test runs them unrolled (the CPU default), and `make test-slow` runs SmolLM2 so too.
@pytest.mark.parametrize("scan", [pytest.param(False, marks=pytest.mark.slow), True], ids=["unrolled", "scan"])
def test_greedy_generation_equals_hf_token_for_token(smollm2_path, hf_smollm2, hf_reference, scan):
    """Both layer forms (unrolled, and one loop over stacked weights) against HF."""
    from maxlike.entrypoints import LLM
    from maxlike.interfaces import SamplingParams
    from maxlike.pipelines import PipelineConfig

    tok, _ = hf_smollm2
    llm = LLM(PipelineConfig(model_path=smollm2_path, max_length=512, max_batch_size=8, scan_layers=scan),
              progress=False)
    assert llm.pipeline.model.scan_layers == scan and len(llm.pipeline.model.kv_manager.pool) == (1 if scan else 30)
    for chat in (True, False):
        prompts = [p for p, c in PROMPTS if c == chat]
        outs = llm.generate_outputs(prompts, max_new_tokens=NEW_TOKENS, use_tqdm=False, chat=chat)
        for out, prompt in zip(outs, prompts):
            ids, ref = hf_reference[prompt, chat]
            assert out.prompt_token_ids == ids
            assert out.token_ids == ref, (prompt, out.text, tok.decode(ref))
            print(f"{prompt!r} -> {out.text!r}")
        if chat:
            assert outs[0].text.strip(), "the chat answer is empty"
    if scan:  # HF's repetition penalty, greedy, on the real model (a prompt whose output repeats)
        ids = tok.encode("1, 2, 3, 1, 2, 3, 1, 2, 3,")
        params = SamplingParams(top_k=1, repetition_penalty=1.3, max_new_tokens=NEW_TOKENS)
        got = llm.generate_outputs([ids], sampling_params=params, use_tqdm=False)[0].token_ids
        with torch.no_grad():
            ref = hf_smollm2[1].generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                         repetition_penalty=1.3)[0, len(ids):].tolist()
        assert got == ref, (tok.decode(got), tok.decode(ref))
        plain = llm.generate_outputs([ids], max_new_tokens=NEW_TOKENS, use_tqdm=False)[0].token_ids
        assert plain != got, "the penalty changed nothing: the check proves nothing"
