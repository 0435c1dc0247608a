"""The Pallas decode-attention kernel (graphs.pallas_attention) against the plain-XLA reference
graphs.attention._attend, in Pallas interpret mode on CPU, plus its Triton lowering (for a CUDA
target, lowered here without a GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graphs.attention import _attend as _attend_eager
from graphs.attention import write_kv
from graphs.pallas_attention import _heuristics, _paged_decode_attention, paged_decode_attention, supported

# The reference and the pool writes jitted (window and layer traced): one compile each instead
# of one per eager op, which is most of this file's time otherwise.
_attend = jax.jit(_attend_eager, static_argnames=("scale", "softcap"))
_write_kv = jax.jit(write_kv)

F32_TOL = 1e-5
BF16_TOL = 2e-2


def make_case(seed, *, lengths, h, kv, d=16, s=4, p=None, r=1, layers=1, dtype=jnp.float32, full_table=False):
    """A pool of noise with each row's keys/values written (by write_kv, into every layer) at
    distinct random pages of its replica; rows' tables end in null (0) entries unless
    `full_table` (then the pages past a row's end are its own, holding noise)."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    rows = b // r
    p = p or max(-(-n // s) for n in lengths)
    n_pages = rows * p + 2  # page 0 (null) + every row's pages + one nobody owns
    shape = (r, layers, n_pages, s, kv, d)
    k_pages = jnp.asarray(rng.standard_normal(shape), dtype)
    v_pages = jnp.asarray(rng.standard_normal(shape), dtype)
    table = np.zeros((b, p), np.int32)
    for rep in range(r):
        ids = rng.permutation(np.arange(1, n_pages))
        for i in range(rows):
            row = rep * rows + i
            used = p if full_table else -(-lengths[row] // s)
            table[row, :used] = ids[i * p : i * p + used]
    t = max(lengths)
    pos = np.arange(t)[None, :]
    slots = np.where(pos < np.asarray(lengths)[:, None], np.take_along_axis(table, pos // s, axis=1) * s + pos % s, 0)
    for layer in range(layers):
        new_k = jnp.asarray(rng.standard_normal((b, t, kv, d)), dtype)
        new_v = jnp.asarray(rng.standard_normal((b, t, kv, d)), dtype)
        k_pages = _write_kv(k_pages, new_k, jnp.asarray(slots, jnp.int32), layer)
        v_pages = _write_kv(v_pages, new_v, jnp.asarray(slots, jnp.int32), layer)
    q = jnp.asarray(rng.standard_normal((b, 1, h, d)), dtype)
    q_pos = jnp.asarray(np.asarray(lengths)[:, None] - 1, jnp.int32)
    return q, k_pages, v_pages, jnp.asarray(table), q_pos


def check(out, ref, tol=F32_TOL):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "h,kv,s,lengths",
    [
        (4, 2, 4, [6, 8, 1]),  # GQA 2: ends mid-page, exactly at a page end, a single key
        (8, 2, 16, [17, 32, 1]),  # GQA 4, 16-token pages
        pytest.param(4, 4, 16, [5], marks=pytest.mark.slow),  # MHA, one row
        pytest.param(8, 2, 4, [13], marks=pytest.mark.slow),  # GQA 4, one row, four pages
        pytest.param(2, 1, 4, [40, 3, 21], marks=pytest.mark.slow),  # GQA 2 over one KV head, ten-page rows
        (6, 2, 4, [9, 4]),  # GQA 3: a group that is not a power of two (padded to 16 heads)
        (4, 2, 16, [150, 64, 65]),  # several 64-key loop steps; a row ending at a step's end, one past it
        (2, 1, 16, [520]),  # long enough for the heuristics to split the pages (flash-decoding)
    ],
)
def test_matches_reference(h, kv, s, lengths):
    q, k, v, table, q_pos = make_case(len(lengths) * 100 + h * 10 + s, lengths=lengths, h=h, kv=kv, s=s)
    if max(lengths) > 512:
        assert _heuristics(len(lengths), kv, s, table.shape[1])[1] > 1
    if len(lengths) > 1:
        assert (np.asarray(table) == 0).any()  # the shorter rows' tables end in null pages
    check(paged_decode_attention(q, k, v, table, q_pos, interpret=True), _attend(q, k, v, table, q_pos, 0))


@pytest.mark.slow  # a repeat of the fast cases' checks: `make test-slow`
def test_pages_past_the_end_are_not_attended():
    """Tables wider than the rows, full of the rows' own (noise-filled) pages past their ends."""
    q, k, v, table, q_pos = make_case(7, lengths=[3, 9, 16], h=4, kv=2, s=4, p=6, full_table=True)
    check(paged_decode_attention(q, k, v, table, q_pos, interpret=True), _attend(q, k, v, table, q_pos, 0))


def test_reads_only_the_rows_keys():
    """Every pool slot that is no row's attended key (past a row's end in its own pages, before
    its window, the null page, pages nobody owns) set to NaN: the kernel never loads them, so
    its output is still the reference's over the clean pool."""
    window, lengths = 6, [7, 12, 1, 20]
    q, k, v, table, q_pos = make_case(41, lengths=lengths, h=4, kv=2, s=4, r=2, p=6, full_table=True)
    poison = poison_unattended(table, lengths, window, k.shape)
    out = paged_decode_attention(q, poison(k), poison(v), table, q_pos, window=window, interpret=True)
    check(out, _attend(q, k, v, table, q_pos, 0, window))


def poison_unattended(table, lengths: list, window: int, shape: tuple):
    """pages -> pages with NaN in every slot of layer 0 that is no row's attended key (rows split
    evenly over the pool's replicas, pool `shape` [R, L, N, S, KV, D])."""
    live = np.zeros(shape[:4], bool)  # [R, L, N, S]
    rows, s = len(lengths) // shape[0], shape[3]
    for b, n in enumerate(lengths):
        for pos in range(max(0, n - window), n):
            live[b // rows, 0, int(table[b, pos // s]), pos % s] = True
    return lambda pages: jnp.where(jnp.asarray(live)[..., None, None], pages, jnp.nan)


@pytest.mark.slow  # a repeat of the fast cases' checks: `make test-slow`
def test_replicas():
    """R=2: rows 0-1 read replica 0, rows 2-3 replica 1 (whose page ids overlap replica 0's)."""
    q, k, v, table, q_pos = make_case(11, lengths=[5, 12, 8, 1], h=4, kv=2, s=4, r=2)
    check(paged_decode_attention(q, k, v, table, q_pos, interpret=True), _attend(q, k, v, table, q_pos, 0))


def test_stacked_layers_static_and_traced():
    q, k, v, table, q_pos = make_case(13, lengths=[7, 16, 2], h=4, kv=2, s=4, layers=3, r=1)
    check(paged_decode_attention(q, k, v, table, q_pos, 2, interpret=True), _attend(q, k, v, table, q_pos, 2))

    @jax.jit
    def both(q, k, v, table, q_pos, layer):
        return (paged_decode_attention(q, k, v, table, q_pos, layer, interpret=True),
                _attend_eager(q, k, v, table, q_pos, layer))

    for layer in (0, 1):
        out, ref = both(q, k, v, table, q_pos, jnp.int32(layer))
        check(out, ref)


def test_window_static_and_traced():
    # S=4, window 5: the 18-key row skips its first three pages entirely, the 5-key row none;
    # window 70: the 150-key row starts in its second 64-key step.
    q, k, v, table, q_pos = make_case(17, lengths=[18, 5, 1, 150], h=4, kv=2, s=4, r=2)
    check(paged_decode_attention(q, k, v, table, q_pos, window=5, interpret=True),
          _attend(q, k, v, table, q_pos, 0, 5))

    @jax.jit
    def both(window):
        return (paged_decode_attention(q, k, v, table, q_pos, window=window, interpret=True),
                _attend_eager(q, k, v, table, q_pos, 0, window))

    for window in (3, 70, 0):  # 0 traced: full attention
        out, ref = both(jnp.int32(window))
        check(out, ref)
    full = _attend(q, k, v, table, q_pos, 0)
    assert not np.allclose(np.asarray(both(jnp.int32(3))[1]), np.asarray(full), atol=1e-3)  # the window matters


@pytest.mark.slow  # a repeat of the fast cases' checks: `make test-slow`
def test_softcap_and_scale():
    q, k, v, table, q_pos = make_case(19, lengths=[9, 4], h=8, kv=2, s=4, layers=2)
    out = paged_decode_attention(q, k, v, table, q_pos, 1, scale=0.9, softcap=2.0, interpret=True)
    ref = _attend(q, k, v, table, q_pos, 1, scale=0.9, softcap=2.0)
    check(out, ref)
    assert not np.allclose(np.asarray(ref), np.asarray(_attend(q, k, v, table, q_pos, 1, scale=0.9)), atol=1e-3)
    assert not np.allclose(np.asarray(ref), np.asarray(_attend(q, k, v, table, q_pos, 1, softcap=2.0)), atol=1e-3)


def test_everything_at_once_under_jit():
    """Replicas, stacked layers, a traced layer and window, softcap and a custom scale together."""
    q, k, v, table, q_pos = make_case(23, lengths=[11, 1, 16, 6], h=4, kv=1, s=4, r=2, layers=3, p=5)

    @jax.jit
    def both(layer, window):
        kw = dict(window=window, scale=0.5, softcap=3.0)
        return (paged_decode_attention(q, k, v, table, q_pos, layer, interpret=True, **kw),
                _attend_eager(q, k, v, table, q_pos, layer, **kw))

    out, ref = both(jnp.int32(2), jnp.int32(6))
    check(out, ref)


@pytest.mark.parametrize("splits,pages_per_block,window", [(3, 4, 30), pytest.param(2, 4, 0, marks=pytest.mark.slow),
                                                           pytest.param(1, 4, 0, marks=pytest.mark.slow), (4, 8, 7)])
def test_split_pages(splits, pages_per_block, window):
    """Flash-decoding: splits over the table (some empty for the short rows) and the combine pass;
    16-key steps, several of them a split (and, with one split, a row)."""
    q, k, v, table, q_pos = make_case(29 + splits, lengths=[90, 3, 33], h=8, kv=2, s=4, r=1, layers=2, p=24)
    out = _paged_decode_attention(q, k, v, table, q_pos, 1, window, scale=None, softcap=None,
                                  pages_per_block=pages_per_block, splits=splits, interpret=True)
    check(out, _attend(q, k, v, table, q_pos, 1, window))


@pytest.mark.slow  # a repeat of the fast cases' checks: `make test-slow`
def test_very_negative_scores():
    """Every score of a row far below 0 (q = -30 x its first key): the row's keys must set the
    running max, not the masked slots of the step (exp would underflow to a zero sum)."""
    q, k, v, table, q_pos = make_case(37, lengths=[1, 2], h=4, kv=2, s=4)
    first_keys = k[0, 0, table[:, 0], 0]  # [B, KV, D]: each row's key at position 0
    q = -30.0 * jnp.repeat(first_keys, 2, axis=1)[:, None]  # [B, 1, H, D]
    ref = _attend(q, k, v, table, q_pos, 0)
    np.testing.assert_allclose(np.asarray(ref[0]), np.asarray(jnp.repeat(v[0, 0, table[0, 0], 0], 2, axis=0))[None],
                               atol=1e-6)  # the single key's value
    check(paged_decode_attention(q, k, v, table, q_pos, interpret=True), ref)


@pytest.mark.slow  # a repeat of the fast cases' checks: `make test-slow`
def test_bfloat16():
    q, k, v, table, q_pos = make_case(31, lengths=[10, 16, 1], h=8, kv=2, s=4, dtype=jnp.bfloat16)
    out = paged_decode_attention(q, k, v, table, q_pos, interpret=True)
    check(out, _attend(q, k, v, table, q_pos, 0), tol=BF16_TOL)


def test_supported():
    q = jax.ShapeDtypeStruct((2, 1, 8, 64), jnp.bfloat16)
    pool = jax.ShapeDtypeStruct((1, 1, 9, 16, 2, 64), jnp.bfloat16)
    assert supported(q, pool)
    assert not supported(jax.ShapeDtypeStruct((2, 3, 8, 64), jnp.bfloat16), pool)  # a prefill
    assert not supported(q, jax.ShapeDtypeStruct((1, 1, 9, 16, 2, 64), jnp.float32))  # mixed dtypes
    assert not supported(jax.ShapeDtypeStruct((2, 1, 8, 80), jnp.bfloat16),
                         jax.ShapeDtypeStruct((1, 1, 9, 16, 2, 80), jnp.bfloat16))  # D not a power of two
    assert not supported(jax.ShapeDtypeStruct((2, 1, 8, 8), jnp.float32),
                         jax.ShapeDtypeStruct((1, 1, 9, 16, 2, 8), jnp.float32))  # D < 16
    assert not supported(jax.ShapeDtypeStruct((2, 1, 6, 64), jnp.float32),
                         jax.ShapeDtypeStruct((1, 1, 9, 16, 4, 64), jnp.float32))  # H % KV
    assert not supported(jax.ShapeDtypeStruct((3, 1, 8, 64), jnp.float32),
                         jax.ShapeDtypeStruct((2, 1, 9, 16, 2, 64), jnp.float32))  # B % R
    with pytest.raises(ValueError):
        pool = jnp.zeros((1, 1, 9, 16, 2, 64))
        paged_decode_attention(jnp.zeros((2, 3, 8, 64)), pool, pool,
                               jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 3), jnp.int32), interpret=True)


@pytest.mark.parametrize("dtype,h,splits,softcap", [(jnp.bfloat16, 8, 1, None), (jnp.float32, 48, 4, 30.0),
                                                     (jnp.float16, 2, 1, None)])
def test_lowers_for_triton(dtype, h, splits, softcap):
    """The kernel goes through Pallas's Triton lowering (to Triton IR, for a CUDA target) on this
    CPU-only machine: block shapes, the page-id gather, the loop. Compiling it needs a GPU."""
    from jax import export

    b, kv, d, r, layers, n, s, p = 4, 2, 64, 2, 3, 40, 16, 8
    args = (jax.ShapeDtypeStruct((b, 1, h, d), dtype), jax.ShapeDtypeStruct((r, layers, n, s, kv, d), dtype),
            jax.ShapeDtypeStruct((r, layers, n, s, kv, d), dtype), jax.ShapeDtypeStruct((b, p), jnp.int32),
            jax.ShapeDtypeStruct((b, 1), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32))

    def f(q, k, v, table, q_pos, layer, window):
        return _paged_decode_attention(q, k, v, table, q_pos, layer, window, scale=None, softcap=softcap,
                                       pages_per_block=4, splits=splits, interpret=False)

    try:
        exported = export.export(jax.jit(f), platforms=["cuda"],
                                 disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        *args)
    except NotImplementedError as e:  # pragma: no cover - a jaxlib without the Triton dialect
        pytest.skip(f"no Triton lowering here: {e}")
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()


def test_the_model_decodes_the_same_with_the_kernel(tiny_models):
    """decode_attention="pallas" through a whole model (interpret mode on CPU): a batch's greedy
    tokens and log-probs equal the plain-XLA attention's, with in-flight batching (decode rows
    beside a prompt chunk in one step)."""
    from maxlike.entrypoints import LLM
    from maxlike.interfaces import SamplingParams
    from maxlike.pipelines import PipelineConfig
    from test_architectures import PROMPTS

    runs = {}
    for kernel in ("xla", "pallas"):
        llm = LLM(PipelineConfig(model_path=tiny_models["llama"][0], max_length=96, max_batch_size=4,
                                 enable_in_flight_batching=True, decode_attention=kernel), progress=False)
        model = llm.pipeline.model
        c, pool = model.config, model.kv_manager.pool[0][0]  # the kernel takes these shapes (no silent fallback)
        assert supported(jax.ShapeDtypeStruct((4, 1, c.q_heads, c.head_dim), pool.dtype), pool)
        outs = llm.generate_outputs([p[:20] for p in PROMPTS], sampling_params=SamplingParams(
            top_k=1, max_new_tokens=12, ignore_eos=True, logprobs=1), use_tqdm=False)
        runs[kernel] = [(o.token_ids, [s.token_log_probabilities[0] for s in o.log_probabilities]) for o in outs]
    for (tokens, lps), (want, want_lps) in zip(runs["pallas"], runs["xla"]):
        assert tokens == want
        np.testing.assert_allclose(lps, want_lps, atol=1e-5)


def test_a_model_the_kernel_does_not_take_says_so(eight_head_models, tiny_models, caplog):
    """decode_attention="pallas" where the backend's kernel does not take the model's shapes (here
    8-wide heads, under Triton's 16) logs that its decode steps run XLA's attention; a model it
    takes logs nothing of the kind."""
    import logging

    from maxlike.entrypoints import LLM
    from maxlike.pipelines import PipelineConfig

    for path, warned in ((eight_head_models["llama"], True), (tiny_models["llama"][0], False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="maxlike"):
            LLM(PipelineConfig(model_path=path, max_length=32, max_batch_size=2, decode_attention="pallas",
                               compile_only=True), progress=False)
        said = [r.getMessage() for r in caplog.records if "decode_attention='pallas'" in r.getMessage()]
        assert bool(said) == warned, said
        if warned:
            assert "graphs.pallas_attention does not take" in said[0] and "8 query heads, 2 KV heads of 8" in said[0]


MESH_MODEL_SCRIPT = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, sys.argv[1])
from conftest import random_prompt
from maxlike.entrypoints import LLM
from maxlike.interfaces import SamplingParams
from maxlike.pipelines import PipelineConfig

prompts = [random_prompt(n, seed=n).tolist() for n in (5, 17, 9, 30)]
report = {}
for kernel in ("xla", "pallas"):
    llm = LLM(PipelineConfig(model_path=sys.argv[2], max_length=64, max_batch_size=4, devices="4",
                             data_parallel_degree=2, tensor_parallel_degree=2, decode_attention=kernel), progress=False)
    outs = llm.generate_outputs(prompts, sampling_params=SamplingParams(top_k=1, max_new_tokens=8, ignore_eos=True),
                                use_tqdm=False)
    hlo = [exe.as_text() for exe in llm.pipeline.model.session.executables()]
    report[kernel] = {"tokens": [o.token_ids for o in outs], "gathers": sum(h.count(" all-gather(") for h in hlo),
                      "kernel": sum(h.count("paged_decode_attention") for h in hlo)}
print(json.dumps(report))
"""


@pytest.mark.slow  # about 40 s: `make test-slow` (test_pallas_tpu_attention's mesh test covers shard_map fast)
def test_a_model_under_a_mesh_runs_the_kernel_per_shard(tiny_models):
    """data 2 x tensor 2 on fake CPU devices with decode_attention="pallas": the decoder hands the
    kernel its mesh, so its executables hold the kernel and gather nothing more than XLA's
    attention's do, and the greedy tokens are XLA attention's."""
    import json
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", MESH_MODEL_SCRIPT, here, tiny_models["llama"][0]],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["pallas"]["tokens"] == report["xla"]["tokens"]
    assert report["pallas"]["kernel"] > 0 and report["xla"]["kernel"] == 0
    assert report["pallas"]["gathers"] == report["xla"]["gathers"], report
