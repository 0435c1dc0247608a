"""Layers as one loop over stacked weights (scan_layers=True) against HF and the unrolled graph."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import TINY_KINDS, build_model, held, random_prompt
from maxlike.pipelines.context import TextContext


def _run(model, prompt, steps: int):
    """Prefill logits of every prompt token, then `steps` greedy decode steps' logits."""
    ctx = held(model, TextContext("r", prompt, max_length=len(prompt) + steps + 1))
    inputs = model.prepare_initial_token_inputs([[ctx]])
    out = model.execute(inputs)
    prefill = np.asarray(out.logits)[0, -len(prompt):]
    decode, tokens = [], []
    for _ in range(steps):
        step = np.asarray(out.next_token_logits)[0]
        decode.append(step)
        tokens.append(int(step.argmax()))
        inputs = model.prepare_next_token_inputs(jnp.asarray([tokens[-1]], jnp.int32), inputs)
        out = model.execute(inputs)
    model.kv_manager.release("r")
    return prefill, np.stack(decode), tokens


@pytest.mark.parametrize("name", list(TINY_KINDS))
def test_scan_equals_unrolled_and_hf(tiny_models, name):
    path, hf = tiny_models[name]
    prompt = random_prompt(13, seed=7)
    unrolled = build_model(path, return_logits="all", scan_layers=False)
    scan = build_model(path, return_logits="all", scan_layers=True)
    # (q/k/v and gate/up fused: the CPU default, graphs.fused)
    assert set(scan.params) - set(unrolled.params) == {"layers.qkv", "layers.o", "layers.gate_up", "layers.down",
                                                       "layers.attn_norm", "layers.mlp_norm"} | (
        {"layers.q_bias", "layers.k_bias", "layers.v_bias"} if name == "qwen2" else set())
    assert scan.params["layers.o"].shape[0] == hf.config.num_hidden_layers
    assert len(scan.kv_manager.pool) == 1 and scan.kv_manager.pool[0][0].shape[1] == hf.config.num_hidden_layers
    a, b = _run(unrolled, prompt, 16), _run(scan, prompt, 16)
    assert np.abs(a[0] - b[0]).max() < 1e-6 and np.abs(a[1] - b[1]).max() < 1e-6
    assert a[2] == b[2]
    with torch.no_grad():  # the independent reference: HF's logits over the prompt and the greedy continuation
        ref = hf(torch.tensor([list(prompt) + b[2][:-1]])).logits[0].numpy()
    assert np.abs(b[0] - ref[: len(prompt)]).max() < 1e-4
    assert np.abs(b[1] - ref[len(prompt) - 1:]).max() < 1e-4


def _pool_copies(model) -> list[str]:
    """HLO lines in the step and decode loops that copy or convert a whole pool array."""
    shape = "[" + ",".join(str(n) for n in model.kv_manager.pool[0][0].shape) + "]"
    lines = []
    for name in ("step", "decode_loop"):
        for exe in model.session.executables(name):
            assert shape in exe.as_text(), f"the {name} program holds no {shape} pool"
            lines += [line for line in exe.as_text().splitlines()
                      for op in (" copy(", " copy-start(", " convert(") if op in line and shape in line.split(op)[0]]
    return lines


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_the_pool_is_donated_and_written_in_place(tiny_llama, scan):
    """No pool-sized copy in the step or the decode loop (whose sampling is a `cond` on the logits)."""
    from maxlike.entrypoints import LLM
    from maxlike.pipelines import PipelineConfig

    llm = LLM(PipelineConfig(model_path=tiny_llama[0], max_length=128, max_batch_size=2, scan_layers=scan,
                             max_num_steps=4), progress=False)
    model = llm.pipeline.model
    before = model.kv_manager.pool[0][0]
    out = llm.generate_outputs([random_prompt(9, seed=1).tolist()], max_new_tokens=6, use_tqdm=False)[0]
    assert len(out.token_ids) == 6
    assert before.is_deleted(), "the pool was not donated"
    assert model.session.executables("decode_loop") and model.session.executables("step")
    assert _pool_copies(model) == []
