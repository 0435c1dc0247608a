"""The PipelineModel contract: compiled steps, donated KV pool, outputs, sizes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from conftest import build_model, held, random_prompt
from maxlike.pipelines import DecoderPipelineModel, ModelInputs, ReturnHiddenStates
from maxlike.pipelines.context import TextContext


def _prefill(model, n=7, rid="e", extra=4):
    ctx = held(model, TextContext(rid, random_prompt(n, seed=n), n + extra))
    return ctx, model.prepare_initial_token_inputs([[ctx]])


def test_kv_pool_is_donated_and_updated_in_place(tiny_llama):
    model = build_model(tiny_llama[0])
    _, inputs = _prefill(model)
    old = model.kv_manager.pool[0][0]
    pointer = old.unsafe_buffer_pointer()
    model.execute(inputs)
    new = model.kv_manager.pool[0][0]
    assert old.is_deleted(), "the pool passed in was donated"
    assert new.unsafe_buffer_pointer() == pointer, "and written in place"
    assert float(jnp.abs(new).sum()) > 0


def test_same_bucket_never_recompiles(tiny_llm):
    stats = tiny_llm.pipeline.model.session.stats
    tiny_llm.generate(["hello there"], max_new_tokens=6, use_tqdm=False)
    before = stats.compiled + stats.loaded  # (the suite shares one executable cache: some may be loaded)
    tiny_llm.generate(["hello world"], max_new_tokens=6, use_tqdm=False)
    tiny_llm.generate(["abcdefghijk"], max_new_tokens=6, use_tqdm=False)  # same buckets
    assert stats.compiled + stats.loaded == before
    assert stats.by_name["step"] >= 1 and stats.by_name["decode_loop"] >= 1


def test_model_inputs_is_a_pytree_of_arrays_only(tiny_llama):
    model = build_model(tiny_llama[0])
    _, inputs = _prefill(model)
    leaves = jax.tree.leaves(inputs)
    assert len(leaves) == 7 and all(isinstance(x, jax.Array) for x in leaves)
    rebuilt = jax.tree.map(lambda x: x, inputs)
    assert isinstance(rebuilt, ModelInputs) and rebuilt.request_ids == ("e",)


def test_hidden_states_and_variable_logits(tiny_models):
    path, hf = tiny_models["llama"]
    model = build_model(path, return_logits="variable", return_hidden_states="all")
    ctx, inputs = _prefill(model, n=9)
    inputs = model.prepare_initial_token_inputs([[held(model, TextContext("v", ctx.tokens, 13))]], return_n_logits=3)
    out = model.execute(inputs)
    with torch.no_grad():
        ref = hf(torch.tensor(ctx.tokens[None], dtype=torch.long), output_hidden_states=True)
    assert np.abs(np.asarray(out.hidden_states)[0, :9] - ref.hidden_states[-1][0].numpy()).max() < 1e-4
    assert out.logits.shape[1] == 3 and list(out.logit_offsets) == [0, 3]
    assert np.abs(np.asarray(out.logits)[0] - ref.logits[0, -3:].numpy()).max() < 1e-4
    last = build_model(path, return_hidden_states=ReturnHiddenStates.LAST)
    out = last.execute(last.prepare_initial_token_inputs([[held(last, TextContext("l", ctx.tokens, 10))]]))
    assert out.hidden_states.shape == (1, 64)
    assert np.abs(np.asarray(out.hidden_states)[0] - ref.hidden_states[-1][0, -1].numpy()).max() < 1e-4


def test_properties(tiny_llama):
    model = build_model(tiny_llama[0])
    assert model.signal_buffers == []  # one device
    assert model.lora_manager is None
    assert model.dtype == jnp.float32
    assert model.huggingface_config.num_hidden_layers == 2


def test_size_estimates_are_real(tiny_llama):
    model = build_model(tiny_llama[0])
    actual = sum(x.nbytes for x in jax.tree.leaves(model.params))
    assert DecoderPipelineModel.estimate_weights_size(model.pipeline_config) == actual
    cfg = model.pipeline_config
    small = DecoderPipelineModel.estimate_activation_memory(cfg.replace(max_length=64), model.huggingface_config)
    big = DecoderPipelineModel.estimate_activation_memory(cfg.replace(max_length=256), model.huggingface_config)
    assert 0 < small < big


def test_the_activation_estimate_bounds_what_xla_holds_at_a_long_max_length(tmp_path):
    """Before anything compiles, the KV pool of an accelerator is planned around a shape-based
    estimate of a step's temporaries. Against XLA's own figures for every executable of the set:
    at max_length 4096 prefill attention holds a block of keys' scores, not the whole table's (an
    estimate of a [4096, 4096] score matrix per head was 40x what the steps held)."""
    import transformers as tf

    from conftest import save_tiny
    from maxlike.engine.session import memory_analysis
    from maxlike.pipelines import PIPELINE_REGISTRY, PipelineConfig

    cfg = tf.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    path = save_tiny(tf.LlamaForCausalLM(cfg), tmp_path / "model")
    config = PipelineConfig(model_path=path, max_length=4096, max_batch_size=2, prefill_chunk_size=512,
                            compile_only=True, cache_dir=str(tmp_path / "cache"))
    _, pipeline = PIPELINE_REGISTRY.retrieve(config, progress=False)
    model = pipeline.model
    estimate = type(model).estimate_activation_memory(config, model.huggingface_config)
    pipeline.compile_all(progress=False)
    held = max(memory_analysis(e)["temp_size_in_bytes"] for e in model.session.executables())
    assert held <= estimate <= 2 * held, (held, estimate)


def test_kv_budget_too_small_says_what_fits(tiny_llama):
    import pytest

    from maxlike.config import ConfigError

    before = len(jax.live_arrays())
    with pytest.raises(ConfigError, match=r"not enough for one sequence of max_length=256\. What fits: max_length <= \d+ with "
                                         r"max_batch_size 1, or max_length <= \d+ with max_batch_size 8"):
        build_model(tiny_llama[0], max_length=256, host_kv_cache_memory_gib=1e-5)
    assert len(jax.live_arrays()) == before, "planned before anything was allocated"


def test_the_kv_pool_size_is_stable_on_accelerators(tiny_llama, monkeypatch, caplog):
    """On an accelerator the pool's page count (part of every executable's key) depends on the
    config and the device's memory size only: not on memory in use nor on whether a warm-up has
    recorded XLA's activation sizes, so warm-cache then a start with the same flags agree."""
    import pytest

    import maxlike.pipelines.sizing as sizing
    from maxlike.config import ConfigError
    from maxlike.engine.session import InferenceSession

    memory = {"bytes_limit": 64 * 2**30, "bytes_in_use": 0}
    monkeypatch.setattr(InferenceSession, "platform", property(lambda self: "gpu"))
    monkeypatch.setattr(sizing, "_memory_stats", lambda device: dict(memory))

    def plan():
        model = build_model(tiny_llama[0], compile_only=True, max_batch_size=64, max_length=256)
        return model, model.kv_manager.num_pages

    roomy, demand = plan()
    assert demand == 64 * 16 + 1, "with room to spare: max_batch_size full-length sequences (+ the null page)"
    # A device that holds about 500 pages besides the weights and the activation estimate:
    weights = sum(int(np.prod(s.shape)) for s in roomy._specs.values()) * roomy.dtype.itemsize
    activations = type(roomy)._activation_estimate(roomy.pipeline_config, roomy.huggingface_config)
    memory["bytes_limit"] = int((weights + activations + 500.5 * roomy.kv_params.page_bytes) / 0.9)
    first, pages = plan()
    assert pages == 448, "500 pages rounded down to a multiple of PAGE_COUNT_STEP"
    first.session.peak_temp_bytes = 123 * 2**20  # as a warm-up would have measured
    first.record_activation_memory()
    assert type(first).estimate_activation_memory(first.pipeline_config, first.huggingface_config) == 123 * 2**20
    memory["bytes_in_use"] = 10 * first.kv_params.page_bytes  # another start: some memory already taken
    again, same = plan()
    assert same == pages and again.session.cache_namespace["kv_pages"] == first.session.cache_namespace["kv_pages"]
    # Not enough left (300 pages' worth): the pool shrinks to what is free.
    memory["bytes_in_use"] = memory["bytes_limit"] - weights - activations - 300 * first.kv_params.page_bytes
    assert plan()[1] == 300
    # Room for 10 pages, not a sequence's 16: the error says what else holds the device's memory.
    memory.update(bytes_in_use=0, bytes_limit=int((weights + activations + 10.5 * first.kv_params.page_bytes) / 0.9))
    with pytest.raises(ConfigError, match=r"KV cache budget \(of [\d.]+ GiB a device x device_memory_utilization=0\.9, "
                                          r"less [\d.]+ GiB of weights and [\d.]+ GiB of step temporaries at this "
                                          r"max_length\) holds 10 pages"):
        plan()
    memory["bytes_limit"] = int(weights / 0.9)  # no room at all: an error, and no talk of memory in use
    caplog.clear()
    with caplog.at_level("WARNING", logger="maxlike"), pytest.raises(ConfigError, match="holds 0 pages"):
        plan()
    assert "already in use" not in caplog.text
