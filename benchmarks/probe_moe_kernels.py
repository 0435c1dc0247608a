"""One MoE layer's expert computation per kernel (graphs.moe), timed alone on this device.

    .venv/bin/python benchmarks/probe_moe_kernels.py [--experts 16] [--hidden 512] [--width 1024]
        [--tokens 1 2 3 8 32] [--dtype float32]

Random weights, top-2 routing renormalized (Mixtral's rule), the layer jitted once per kernel and
token count; prints the best of 10 runs in ms. The figures behind MOE_KERNEL_DEFAULT in
maxlike/pipelines/layout.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from graphs.moe import KERNELS, ExpertRun, MoESpec, moe_mlp  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 8, 32])
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    e, d, f, dtype = args.experts, args.hidden, args.width, jnp.dtype(args.dtype)
    spec = MoESpec(e, 2, f, True, (True,), "", ("", "", ""))
    keys = jax.random.split(jax.random.PRNGKey(0), 5)  # drawn on the device (Mixtral's width: GBs of weights)
    lw = {"router": jax.random.normal(keys[0], (d, e), dtype),
          "experts_gate": jax.random.normal(keys[1], (e, d, f), dtype) * 0.02,
          "experts_up": jax.random.normal(keys[2], (e, d, f), dtype) * 0.02,
          "experts_down": jax.random.normal(keys[3], (e, f, d), dtype) * 0.02}
    print(f"{jax.devices()[0].device_kind}: {e} experts, hidden {d}, width {f}, top-2, {args.dtype}; ms per layer")
    for m in args.tokens:
        x = jax.random.normal(jax.random.fold_in(keys[4], m), (m, 1, d), dtype)
        line = f"{m:4d} tokens:"
        for kernel in KERNELS:
            fn = jax.jit(lambda x, lw, kernel=kernel: moe_mlp(x, lw, spec, ExpertRun(kernel)))
            jax.block_until_ready(fn(x, lw))
            times = []
            for _ in range(10):
                t = time.perf_counter()
                jax.block_until_ready(fn(x, lw))
                times.append(time.perf_counter() - t)
            line += f"  {kernel} {min(times) * 1e3:7.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
