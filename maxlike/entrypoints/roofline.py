"""The roofline report of `maxlike benchmark --roofline`: how close decode is to the memory
bandwidth limit and prefill to the matmul limit, both measured on this device at start.

Decode is bound by the bytes each step must read: every weight once (a device's share of it
under tensor parallelism; of a mixture-of-experts layer, the experts the step's tokens are routed
to) plus the keys and values each row attends to. Prefill is bound by
matmul throughput: about 2 FLOPs per weight per token, plus attention's. The peaks are
measured, not taken from a data sheet. Bandwidth is the better of an elementwise pass over a
large array (bytes read + written per second) and a matrix-vector product over a large matrix
(its bytes read once): on the 2-core CPU here XLA's elementwise pass reached 5.8 GB/s and the
matrix-vector product 35 GB/s (numpy's copy: 27 GB/s), and decode streams its weights the second
way. Matmul peak: a square matmul in the model's dtype.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class Peaks:
    bandwidth_gb_s: float  # the better of an elementwise pass (read + written) and a matrix-vector product
    matmul_tflop_s: float  # a square matmul in the model's dtype


def best_seconds(fn, *args, repeats: int = 5, min_seconds: float = 0.0) -> float:
    """The fastest of `repeats` runs of `fn(*args)` (after one untimed run: compile, first-run costs),
    or of as many more as fill `min_seconds`."""
    jax.block_until_ready(fn(*args))  # compile and first run
    times = []
    while len(times) < repeats or sum(times) < min_seconds:
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def measure_peaks(device, dtype, *, copy_mib: int | None = None, matmul_n: int | None = None) -> Peaks:
    """This device's memory bandwidth and matmul throughput (sizes scale with the platform)."""
    accel = device.platform != "cpu"
    copy_mib = copy_mib or (1024 if accel else 256)
    matmul_n = matmul_n or (8192 if accel else 2048)
    # An accelerator's pass takes about a millisecond: five of them measured an H200's bandwidth anywhere from
    # 2.7 to 3.4 TB/s from one process to the next, so each figure is the best over a quarter of a second.
    best = functools.partial(best_seconds, min_seconds=0.25 if accel else 0.0)
    with jax.default_device(device):
        x = jnp.ones((copy_mib * 2**20 // 4,), jnp.float32)
        t = best(jax.jit(lambda a: a * 1.5 + 1.0), x)
        passes = 2 * x.nbytes / t / 1e9
        side = int(np.sqrt(x.size))
        matrix, vector = x[: side * side].reshape(side, side), jnp.ones((side, 1), jnp.float32)
        t = best(jax.jit(lambda w, v: w @ v), matrix, vector)
        gemv = side * side * 4 / t / 1e9
        a = jnp.ones((matmul_n, matmul_n), dtype)
        t = best(jax.jit(lambda p, q: p @ q), a, a)
        flops = 2 * matmul_n**3 / t / 1e12
    return Peaks(max(passes, gemv), flops)


def weight_bytes(model, batch: int = 1) -> int:
    """Bytes of weights one device must read per decode step of `batch` rows: each array's
    per-device shard; of a mixture-of-experts layer's experts, only those the tokens are routed to
    (`expert_share`); of an embedding table that is not also the LM head (untied, or held apart
    from a quantized head), only the rows of the step's tokens, at most `batch` of them on a device."""
    total = 0
    share = expert_share(model, batch)
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, arr in model.params.items():
        shard = arr.sharding.shard_shape(arr.shape) if hasattr(arr, "sharding") else arr.shape
        if name in ("embed", "embed_scale") and (not tied or "head" in model.params):  # a gather of the
            shard = (min(batch, shard[0]), *shard[1:])  # tokens' rows (a tied table is the head, unless one is held)
        total += int(np.prod(shard)) * arr.dtype.itemsize * (share if ".experts_" in name else 1)
    return int(total)


def expert_share(model, tokens: int) -> float:
    """The expected share of a MoE layer's experts `tokens` tokens are routed to, were routing
    uniform: 1 - (1 - k / E)^tokens (1 for a dense model's weights, which never match)."""
    moe = getattr(model.config, "moe", None)
    return 1.0 if moe is None else 1.0 - (1.0 - moe.top_k / moe.experts) ** tokens


def kv_bytes(model, batch: int, context: int) -> int:
    """Keys and values `batch` rows of `context` tokens attend to in one step, per device."""
    p = model.kv_manager.params
    kv_heads = p.kv_heads // max(1, model.tensor_parallel_degree)
    itemsize = jnp.dtype(p.dtype).itemsize
    return 2 * p.num_layers * batch * context * max(1, kv_heads) * p.head_dim * itemsize


def matmul_flops_per_token(model) -> int:
    """2 FLOPs per weight a token passes through (embeddings are a gather, not a matmul), counted
    from the architecture's own weight shapes: a quantized model does the same matmuls (its packed
    values and scales are not weights)."""
    cfg = model.config
    moe = getattr(cfg, "moe", None)
    active = 1.0 if moe is None else moe.top_k / moe.experts  # a token passes through its top-k experts only
    n = sum(int(np.prod(spec.shape)) * (active if ".experts_" in name else 1)
            for name, spec in model.arch.weight_specs(cfg).items() if name != "embed")
    if getattr(cfg, "tie_word_embeddings", False):
        n += cfg.vocab_size * cfg.hidden_size  # the tied head is a matmul over the embedding table
    return int(2 * n)


def attention_flops(model, tokens: int, context: int) -> int:
    """Scores and weighted values: 4 FLOPs per (query head, key, head dim) per layer."""
    cfg = model.config
    return 4 * cfg.num_layers * tokens * context * cfg.q_heads * cfg.head_dim


def report(model, peaks: Peaks, rows: list[dict], prompt_tokens: int, new_tokens: int) -> list[dict]:
    """Roofline rows from `measure`'s results (one per batch size)."""
    out = []
    devices = max(1, model.tensor_parallel_degree)
    for r in rows:
        b = r["batch"]
        context = prompt_tokens + new_tokens // 2  # the mean context a decode step attends to
        weights = weight_bytes(model, b)
        step_bytes = weights + kv_bytes(model, b, context)
        step_s = b / r["decode_tok_s"]  # a decode step makes one token per row
        achieved = step_bytes / step_s / 1e9
        per_prompt = (matmul_flops_per_token(model) * prompt_tokens
                      + attention_flops(model, prompt_tokens, prompt_tokens) // 2) / devices  # causal: half of it
        prefill_tflop_s = per_prompt * r["prefill_tok_s"] / prompt_tokens / 1e12
        out.append({**r, "weight_bytes": weights, "step_bytes": step_bytes, "decode_gb_s": achieved,
                    "decode_roofline_share": achieved / peaks.bandwidth_gb_s,
                    "decode_roofline_tok_s": b * peaks.bandwidth_gb_s * 1e9 / step_bytes,
                    "prefill_tflop_s": prefill_tflop_s,
                    "prefill_roofline_share": prefill_tflop_s / peaks.matmul_tflop_s, "peaks": asdict(peaks)})
    return out


def print_report(rows: list[dict]) -> None:
    p = rows[0]["peaks"]
    print(f"device peaks: memory {p['bandwidth_gb_s']:.1f} GB/s, matmul {p['matmul_tflop_s']:.3f} TFLOP/s", flush=True)
    for r in rows:
        print(f"batch {r['batch']:3d}: decode {r['decode_tok_s']:8.1f} tok/s, reads {r['step_bytes'] / 1e6:8.1f} MB "
              f"per step = {r['decode_gb_s']:7.1f} GB/s, {100 * r['decode_roofline_share']:5.1f}% of memory "
              f"bandwidth (roofline {r['decode_roofline_tok_s']:.0f} tok/s) | prefill {r['prefill_tok_s']:8.1f} "
              f"tok/s = {r['prefill_tflop_s']:.3f} TFLOP/s, {100 * r['prefill_roofline_share']:5.1f}% of matmul peak",
              flush=True)
