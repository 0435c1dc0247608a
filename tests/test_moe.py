"""Mixture-of-experts models against transformers (fp32, eager): tiny random Mixtral (softmax,
top-2, renormalized) and Qwen3-MoE (top-2 not renormalized, a dense layer among the expert
layers), with the grouped (ragged_dot), dense, gather and loop expert kernels; expert parallelism on fake
devices; llama.cpp's stacked-expert GGUF tensors; compiling for a TPU slice split by experts."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import MOE_KINDS, build_model, save_tiny, tiny_moe_model
from test_architectures import PROMPTS, _llm, assert_generation_matches, assert_prefill_matches, prefill_logits


@pytest.mark.parametrize("kernel", ["grouped", "dense", "gather", "loop"])
@pytest.mark.parametrize("name", MOE_KINDS)
def test_prefill_logits_match_hf(moe_models, name, kernel):
    path, hf = moe_models[name]
    model = build_model(path, return_logits="all", moe_kernel=kernel)
    assert model.experts.kernel == kernel
    assert_prefill_matches(model, hf, PROMPTS[1])


@pytest.mark.parametrize("name", ["mixtral", pytest.param("qwen3_moe", marks=pytest.mark.slow)])  # slow: test-slow
def test_generation_matches_hf_batched_and_alone(moe_models, name):
    """32 greedy tokens equal HF's generate for each prompt (the CPU default, the loop over experts);
    each prompt alone, and the batch with chunked prefill, 4-token pages, (Mixtral, whose layers are
    all alike) the layers as one loop and the grouped kernel, give the same tokens and log-probs."""
    path, hf = moe_models[name]
    llm = _llm(path)
    assert llm.pipeline.model.experts.kernel == "loop"
    other = _llm(path, prefill_chunk_size=16, kv_cache_page_size=4, scan_layers=name == "mixtral", moe_kernel="grouped")
    assert other.pipeline.model.scan_layers == (name == "mixtral")
    assert_generation_matches(hf, llm, "chunked, paged, grouped", other)


def test_router_weights_follow_each_models_rule():
    """graphs.moe.route against the two rules written out: Mixtral renormalizes the top-2 of the
    softmax, Qwen3-MoE without norm_topk_prob keeps the softmax's own values."""
    import jax.numpy as jnp

    from graphs.moe import MoESpec, route

    x = np.random.RandomState(0).randn(5, 6).astype(np.float32)
    router = np.random.RandomState(1).randn(6, 4).astype(np.float32)
    logits = x @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1)[:, :2]
    picked = np.take_along_axis(probs, top, axis=-1)
    for renormalize, want in ((True, picked / picked.sum(-1, keepdims=True)), (False, picked)):
        spec = MoESpec(4, 2, 8, renormalize, (True,), "mlp", ("a", "b", "c"))
        weights, experts = route(jnp.asarray(x), jnp.asarray(router), spec)
        np.testing.assert_array_equal(np.asarray(experts), top)
        np.testing.assert_allclose(np.asarray(weights), want, rtol=1e-5)


# The fast suite splits experts x tensor 2x2 (layers as one loop); `make test-slow` adds experts split 4
# ways and 2 replicas of expert 2 (the fast suite's time: each mesh compiles the whole step again).
@pytest.mark.parametrize("meshes", [[[1, 2, 1, 0, None, 2]], pytest.param(
    [[1, 1, 0, 0, None, 4], [2, 1, 0, 0, None, 2]], marks=pytest.mark.slow)], ids=["expert-tensor", "expert-data"])
def test_expert_parallel_equals_one_device(moe_models, meshes):
    """Experts split over devices, alone or with tensor or data parallelism, on fake CPU devices:
    one device's tokens and logits, with no expert weight gathered."""
    from test_multidevice import _run_meshes

    report = _run_meshes(moe_models["mixtral"][0], [[1, 1], *meshes])
    one = report.pop("1x1")
    assert len(report) == len(meshes)
    for label, r in report.items():
        assert r["tokens"] == one["tokens"], label
        assert np.abs(np.asarray(r["logits"]) - np.asarray(one["logits"])).max() < 1e-5, label
        assert r["gathered_weights"] == [], f"{label}: the step all-gathers whole weights {r['gathered_weights']}"
        assert r["all_reduce"] > 0, label
        data, tensor = (int(n) for n in label.split("-")[0].split("x"))  # e.g. "1x2-expert2-scan"
        assert r["mesh"] == {"data": data, "expert": int(label.split("expert")[1].split("-")[0]), "tensor": tensor}


@pytest.mark.parametrize("name", ["mixtral", pytest.param("qwen3_moe", marks=pytest.mark.slow)])  # slow: test-slow
def test_gguf_with_stacked_experts_equals_the_safetensors_run(name, tmp_path):
    """llama.cpp's layout: Mixtral as arch "llama" with expert metadata and permuted q/k rows,
    Qwen3-MoE as "qwen3moe" (every layer experts, top-k renormalized, as llama.cpp runs it);
    the experts as ffn_{gate,up,down}_exps stacks. Logits equal HF's and the safetensors run's."""
    from gguf_util import write_arch_gguf

    kw = {} if name == "mixtral" else dict(mlp_only_layers=[], norm_topk_prob=True)
    hf = tiny_moe_model(name, seed=3, **kw)
    path = tmp_path / f"{name}.gguf"
    write_arch_gguf(path, "llama" if name == "mixtral" else "qwen3moe", hf)
    model = build_model(str(path), return_logits="all")
    assert type(model.config.moe).__name__ == "MoESpec" and all(model.config.moe.layers)
    assert_prefill_matches(model, hf, PROMPTS[1])
    from_safetensors = build_model(save_tiny(hf, tmp_path / "st"), return_logits="all")
    assert from_safetensors.config.moe == model.config.moe  # (eps differs: GGUF keeps it as float32)
    logits = [prefill_logits(m, PROMPTS[1]) for m in (model, from_safetensors)]
    assert np.abs(logits[0] - logits[1]).max() < 1e-5


def test_quantized_expert_stacks_are_read_as_the_files_values(tmp_path):
    """A Mixtral GGUF whose ffn_*_exps stacks are Q8_0 (as llama.cpp quantizes them): the experts
    load dequantized, equal to the gguf package's own dequantization of each stack."""
    import gguf
    from gguf.quants import dequantize
    from gguf_util import write_arch_gguf

    path = tmp_path / "q8.gguf"
    write_arch_gguf(path, "llama", tiny_moe_model("mixtral", seed=3), experts_qtype="Q8_0")
    model = build_model(str(path))
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for i in range(2):
        for kind, name in (("experts_gate", "gate"), ("experts_up", "up"), ("experts_down", "down")):
            t = tensors[f"blk.{i}.ffn_{name}_exps.weight"]
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            want = dequantize(t.data, t.tensor_type).transpose(0, 2, 1)  # [E, out, in] -> ours [E, in, out]
            np.testing.assert_array_equal(np.asarray(model.params[f"layers.{i}.{kind}"]), want)


def test_expert_meshes_that_do_not_fit_are_named(moe_models, tiny_llama):
    from maxlike.config import ConfigError
    from maxlike.engine.mesh import plan_mesh
    from maxlike.entrypoints import LLM
    from maxlike.pipelines import PipelineConfig

    moe = dict(q_heads=4, kv_heads=2, vocab=320, intermediate=64, experts=8, expert_width=64)
    assert plan_mesh([None] * 8, None, None, 4, **moe) == (1, 4, 2)
    assert plan_mesh([None] * 8, 2, 2, 2, **moe) == (2, 2, 2)
    with pytest.raises(ConfigError, match=r"its 8 experts do not split 3 ways. Degrees that fit: \[1, 2\]"):
        plan_mesh([None] * 6, None, None, 3, **moe)
    with pytest.raises(ConfigError, match=r"x expert_parallel_degree=2 needs 8 devices but 4 are selected"):
        plan_mesh([None] * 4, 2, 2, 2, **moe)
    with pytest.raises(ConfigError, match=r"its experts' width 6 does not split 4 ways. Degrees that fit: \[1, 2\]"):
        plan_mesh([None] * 4, None, 4, **{**moe, "expert_width": 6})
    with pytest.raises(ConfigError, match="expert_parallel_degree=2 splits a mixture-of-experts model's experts, "
                                          "and this model has none"):
        LLM(PipelineConfig(model_path=tiny_llama[0], expert_parallel_degree=2), progress=False)
    with pytest.raises(ConfigError, match="expert_parallel_degree=2 does not divide the 1 selected devices"):
        LLM(PipelineConfig(model_path=moe_models["mixtral"][0], expert_parallel_degree=2), progress=False)
    with pytest.raises(ConfigError, match="moe_kernel='megablox' is not built: use 'grouped', 'dense', 'gather' "
                                          "or 'loop'"):
        PipelineConfig(model_path=tiny_llama[0], moe_kernel="megablox")


def test_weights_and_listing_count_every_expert(moe_models):
    """estimate_weights_size counts the 8 experts of each MoE layer (the formula written out), and
    `maxlike list` names both architectures."""
    from maxlike.entrypoints.cli import main
    from maxlike.pipelines import PIPELINE_REGISTRY, PipelineConfig

    hf = moe_models["mixtral"][1].config
    d, f, e, v, layers = hf.hidden_size, hf.intermediate_size, 8, hf.vocab_size, hf.num_hidden_layers
    kv = hf.num_key_value_heads * (d // hf.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 2 * d + d * e + e * 3 * d * f
    want = 4 * (2 * v * d + d + layers * per_layer)
    config = PipelineConfig(model_path=moe_models["mixtral"][0], dtype="float32")
    arch = PIPELINE_REGISTRY.retrieve_architecture(hf)
    assert arch.pipeline_model.estimate_weights_size(config) == want
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["list"])
    assert "MixtralForCausalLM" in out.getvalue() and "Qwen3MoeForCausalLM" in out.getvalue()


def test_quantized_attention_keeps_the_experts_in_float(moe_models, caplog):
    """int8 quantizes attention; the experts stay float32 (not built quantized), and the log says so."""
    import logging

    with caplog.at_level(logging.WARNING, logger="maxlike"):
        model = build_model(moe_models["mixtral"][0], quantization_encoding="int8")
    assert "the experts stay in the model's float dtype" in caplog.text
    dtypes = {name: str(a.dtype) for name, a in model.params.items()}
    assert dtypes["layers.0.qkv"] == "int8" and dtypes["layers.0.experts_gate"] == "float32"  # (CPU fuses q/k/v)


def test_roofline_counts_the_routed_experts(moe_models):
    """The roofline's bytes per decode step read only the experts a step's tokens are expected to
    be routed to (1 - (1 - k/E)^tokens of them) and, of the untied embedding table, the tokens'
    rows; its FLOPs pass each token through k experts."""
    from maxlike.entrypoints import roofline

    model = build_model(moe_models["mixtral"][0])
    hf = moe_models["mixtral"][1].config
    d, f, layers = hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers
    experts = layers * 8 * 3 * d * f
    rest = sum(int(np.prod(a.shape)) for a in model.params.values()) - experts
    assert not hf.tie_word_embeddings
    for tokens in (1, 8):
        share = 1 - (1 - 2 / 8) ** tokens
        gathered = rest - hf.vocab_size * d + tokens * d  # the embedding table: a row per token
        assert roofline.weight_bytes(model, tokens) == int(4 * (gathered + experts * share))
    assert roofline.matmul_flops_per_token(model) == 2 * (rest - hf.vocab_size * d + experts * 2 // 8)


@pytest.mark.slow  # about 25 s: `make test-slow` (the fast suite must stay under 15 minutes)
@pytest.mark.tpu_target
def test_tpu_slice_split_by_experts_compiles(moe_models, tmp_path):
    """warm-cache for a TPU v5e 2x2 slice with the tiny Mixtral's 8 experts split 4 ways."""
    from test_tpu_target import _check_one_step_per_bucket, warm_cache

    result = warm_cache(tmp_path, "--model-path", moe_models["mixtral"][0], "--expert-parallel-degree", "4",
                        "--max-length", "64", "--max-batch-size", "2")
    records = _check_one_step_per_bucket(result, tmp_path, "(('data', 1), ('expert', 4), ('tensor', 1))")
    assert records


def test_moe_kernels_agree_on_random_routings():
    """The four kernels on one device, and on a local slice of the experts (as one expert shard
    computes them), against the sum written out token by token."""
    import jax.numpy as jnp

    from graphs.moe import _dense, _gather, _grouped, _loop

    rs = np.random.RandomState(0)
    m, d, f, e, k = 7, 5, 6, 4, 2
    x = rs.randn(m, d).astype(np.float32)
    gate, up = rs.randn(e, d, f).astype(np.float32), rs.randn(e, d, f).astype(np.float32)
    down = rs.randn(e, f, d).astype(np.float32)
    experts = np.stack([rs.choice(e, k, replace=False) for _ in range(m)]).astype(np.int32)
    weights = rs.rand(m, k).astype(np.float32)

    def silu(a):
        return a / (1 + np.exp(-a))

    def expected(first, count):
        out = np.zeros((m, d), np.float32)
        for t in range(m):
            for j in range(k):
                ex = experts[t, j]
                if first <= ex < first + count:
                    out[t] += weights[t, j] * ((silu(x[t] @ gate[ex]) * (x[t] @ up[ex])) @ down[ex])
        return out

    for first, count in ((0, e), (2, 2), (0, 2)):
        part = slice(first, first + count)
        for kernel in (_grouped, _dense, _gather, _loop):
            got = kernel(jnp.asarray(x), jnp.asarray(weights), jnp.asarray(experts), jnp.asarray(gate[part]),
                         jnp.asarray(up[part]), jnp.asarray(down[part]), first)
            np.testing.assert_allclose(np.asarray(got), expected(first, count), rtol=1e-4, atol=1e-4,
                                       err_msg=f"{kernel.__name__} experts {first}..{first + count - 1}")

