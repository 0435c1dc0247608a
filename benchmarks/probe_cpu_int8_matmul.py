"""Probe for issue 16 (weights kept quantized): does XLA:CPU stream int8 weights faster than fp32?

    .venv/bin/python benchmarks/probe_cpu_int8_matmul.py

30 matrix products of SmolLM2's MLP shape ([576, 1536]), batch 1 and 8: fp32 weights, against
int8 weights with per-column scales dequantized in the graph (convert then dot, and a mixed-type
einsum). Best of 7, jitted, on this machine's default device.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np


def best(f, *a):
    jax.block_until_ready(f(*a))
    t = []
    for _ in range(7):
        s = time.perf_counter()
        jax.block_until_ready(f(*a))
        t.append(time.perf_counter() - s)
    return min(t)


rng = np.random.default_rng(0)
L, D, F = 30, 576, 1536   # SmolLM2's MLP shapes, 30 layers
ws = [rng.standard_normal((D, F)).astype(np.float32) for _ in range(L)]
qs = [np.clip(np.round(w / (np.abs(w).max(0) / 127)), -127, 127).astype(np.int8) for w in ws]
ss = [(np.abs(w).max(0) / 127).astype(np.float32) for w in ws]
for b in (1, 8):
    x = jnp.ones((b, D), jnp.float32)
    f32 = jax.jit(lambda x, ws: sum(x @ w for w in ws))
    q8 = jax.jit(lambda x, qs, ss: sum((x @ q.astype(jnp.float32)) * s for q, s in zip(qs, ss)))
    q8b = jax.jit(lambda x, qs, ss: sum(jnp.einsum("bd,df->bf", x, q, preferred_element_type=jnp.float32) * s
                                        for q, s in zip(qs, ss)))
    wf, wq, sq = ([jnp.asarray(a) for a in group] for group in (ws, qs, ss))
    tf, tq = best(f32, x, wf), best(q8, x, wq, sq)
    try:
        tqb = best(q8b, x, wq, sq)
    except Exception as e:
        tqb = float("nan")
        print("mixed einsum failed", type(e).__name__)
    mb = sum(w.nbytes for w in ws) / 1e6
    print(f"b{b}: f32 {tf * 1e3:.2f} ms ({mb / tf / 1e3:.1f} GB/s) | int8 convert-then-dot {tq * 1e3:.2f} ms | "
          f"int8 mixed einsum {tqb * 1e3:.2f} ms")
