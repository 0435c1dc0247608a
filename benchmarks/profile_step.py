"""A decode step under `jax.profiler`: the kernels it runs, the time inside them, and the time
not spent moving weights (a probe for the note and the README, not a test).

    .venv/bin/python benchmarks/profile_step.py [--model-path P] [--batch-sizes 1 8] [--new-tokens 33]
        [--max-num-steps 1] [--setup float|bf16|int8+fused|...] [--json F] [--trace-dir D]

Default model: the embedded SmolLM2 GGUF (on a GPU, `--shape llama-1b` builds a random
Llama-3.2-1B-shaped bf16 checkpoint instead, as bench_gpu_decode.py does). For each batch, greedy
generation of 1 and of `--new-tokens` tokens is traced (after untraced runs of each, so no
compile is in the trace), and a decode step is their difference over the extra tokens, as
`maxlike.entrypoints.bench.measure` counts time. From the traces (`jax.profiler.ProfileData`):

- on a GPU, every event on a device plane's stream lines is a kernel (or a copy);
- on CPU, the events XLA's CPU client records while it runs an executable's thunks (its fusions,
  dots, sorts, custom calls; XLA:CPU runs them in one thread pool, so they are not launches).

An event that holds others on its line (a loop, a conditional) is not counted; its contents are.

Printed per decode step (an average: a decode step's attention reads a power-of-two number of
pages, so its kernels change as the context grows): kernels, the time inside them (summed; they
may overlap on CPU), the wall time without the profiler, the step's bytes (weights and the KV it
attends to, maxlike.entrypoints.roofline) over the copy bandwidth measured at start, i.e. the
step's floor, and what is left above that floor; then the kernels that took the most time, each
with the JAX op it came from (its HLO instruction's `op_name`, named scopes "attention" and "mlp"
included) where the compiled HLO keeps that metadata (XLA:CPU drops it from some fusions and dots).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from bench_gpu_decode import build_model, setup_config  # noqa: E402
from maxlike.entrypoints import roofline as rl  # noqa: E402
from maxlike.entrypoints.bench import maxlike_generate, prompts_for  # noqa: E402
from maxlike.entrypoints.llm import default_model_path  # noqa: E402
from maxlike.pipelines import PipelineConfig  # noqa: E402

# Events that are bookkeeping, not work (CPU client thread pools; GPU derived lines).
NOT_KERNELS = ("ThreadpoolListener", "ThunkExecutor", "SlinkyThreadPool", "end: ")
DERIVED_LINES = ("XLA Modules", "XLA Ops", "Steps", "Framework", "Source", "XLA TraceMe", "TensorFlow", "Launch")


def kernel_events(path: str) -> list[tuple[str, float]]:
    """(name, duration in µs) of each kernel event in one trace file (module doc)."""
    from jax.profiler import ProfileData

    events = []
    for plane in ProfileData.from_file(path).planes:
        device = plane.name.startswith("/device:") and "CPU" not in plane.name
        for line in plane.lines:
            if device:
                if line.name.startswith(DERIVED_LINES):
                    continue
            elif plane.name != "/host:CPU" or not line.name.startswith("tf_XLA"):
                continue
            work = sorted(((e.start_ns, e.duration_ns, e.name) for e in line.events
                           if not e.name.startswith(NOT_KERNELS)), key=lambda t: (t[0], -t[1]))
            # a loop or conditional holds its body's events: count those, not it. Only an event that
            # wholly holds the next is one: on a GPU a kernel may start before the last one ends
            # (Hopper's programmatic dependent launch), and both are kernels.
            events += [(name, length / 1e3) for i, (start, length, name) in enumerate(work)
                       if i + 1 == len(work) or sum(work[i + 1][:2]) > start + length]
    return events


def kernel_origins(hlo_texts: list[str], names) -> dict[str, str]:
    """{kernel name: the op_name of the HLO instruction of that name, or else of the first op inside
    the computation it calls (a fusion's)} over the executables' optimized HLO texts, the first text
    that has the name winning (a trace writes "loop_add_fusion_19" where the text has
    "%loop_add_fusion.19")."""
    wanted, found = set(names), {}
    for text in hlo_texts:
        inside, computation = {}, None  # computation name -> the first op_name in its body
        for line in text.splitlines():
            start = re.match(r"\s*(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
            if start and " = " not in line:
                computation = start.group(1)
            op = re.search(r'op_name="([^"]*)"', line)
            if op and computation and computation not in inside:
                inside[computation] = op.group(1)
        for line in text.splitlines():
            head = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
            key = head and head.group(1).replace(".", "_").replace("-", "_")
            if key in wanted and key not in found:
                op, calls = re.search(r'op_name="([^"]*)"', line), re.search(r"calls=%?([\w.\-]+)", line)
                found[key] = op.group(1) if op else inside.get(calls.group(1), "") if calls else ""
    return found


def traced(generate, prompts, n: int, trace_dir: str) -> tuple[list[tuple[str, float]], float]:
    """Kernel events of `generate(prompts, n)` under the profiler, and its best wall seconds of two
    runs without it (tracing a thousand events a step slows the step down)."""
    walls = []
    for _ in range(3):  # the first compiles: it stays out of the figures
        start = time.perf_counter()
        generate(prompts, n)
        walls.append(time.perf_counter() - start)
    folder = tempfile.mkdtemp(dir=trace_dir)
    with jax.profiler.trace(folder):
        generate(prompts, n)
    [path] = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
    return kernel_events(path), min(walls[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path")
    ap.add_argument("--shape", help="a random checkpoint of this bench_gpu_decode.SHAPES shape (GPU)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=33)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-num-steps", type=int, default=1)
    ap.add_argument("--setup", default="float", help="e.g. bf16, int8, int8+fused, q4_k+scan, pallas")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--trace-dir", help="keep the traces here (TensorBoard / xprof can open them)")
    ap.add_argument("--json")
    args = ap.parse_args()
    path = args.model_path or default_model_path()
    if args.shape:
        path = os.path.join(tempfile.mkdtemp(), args.shape)
        build_model(args.shape, path, "cpu")
    trace_dir = args.trace_dir or tempfile.mkdtemp()
    os.makedirs(trace_dir, exist_ok=True)
    config = PipelineConfig(model_path=path, max_length=args.prompt_tokens + args.new_tokens + 8,
                            max_batch_size=max(args.batch_sizes), max_num_steps=args.max_num_steps,
                            **setup_config(args.setup))
    llm, generate = maxlike_generate(config)
    model = llm.pipeline.model
    peaks = rl.measure_peaks(model.devices[0], model.dtype)
    print(f"{jax.devices()[0].platform} {args.setup}: copy bandwidth {peaks.bandwidth_gb_s:.1f} GB/s; "
          f"traces in {trace_dir}", flush=True)
    rows = []
    for batch in args.batch_sizes:
        prompts = prompts_for(batch, args.prompt_tokens, model.config.vocab_size)
        one, wall_one = traced(generate, prompts, 1, trace_dir)
        many, wall_many = traced(generate, prompts, args.new_tokens, trace_dir)
        steps = args.new_tokens - 1
        context = args.prompt_tokens + args.new_tokens // 2  # a row's mean context over the decode steps
        step_bytes = rl.weight_bytes(model, batch) + rl.kv_bytes(model, batch, context)
        floor_ms = step_bytes / (peaks.bandwidth_gb_s * 1e9) * 1e3
        per_name = collections.defaultdict(lambda: [0, 0.0])
        for name, us in many:
            per_name[name][0] += 1
            per_name[name][1] += us
        for name, us in one:
            per_name[name][0] -= 1
            per_name[name][1] -= us
        row = {"batch": batch, "setup": args.setup, "steps": steps,
               "kernels_per_step": (len(many) - len(one)) / steps,
               "kernel_ms_per_step": (sum(us for _, us in many) - sum(us for _, us in one)) / steps / 1e3,
               "wall_ms_per_step": (wall_many - wall_one) / steps * 1e3,
               "step_bytes": step_bytes, "floor_ms": floor_ms,
               "top": sorted(((name, n / steps, us / steps / 1e3) for name, (n, us) in per_name.items()),
                             key=lambda t: -t[2])[: args.top]}
        row["above_floor_ms"] = row["wall_ms_per_step"] - floor_ms
        # (each executable numbers its instructions on its own: the decode loops, which run the steps, first)
        loops = model.session.executables("decode_loop")
        texts = [e.as_text() for e in loops + [e for e in model.session.executables() if e not in loops]]
        origins = kernel_origins(texts, [name.replace(".", "_").replace("-", "_") for name, _, _ in row["top"]])
        row["top"] = [(name, n, ms, origins.get(name.replace(".", "_").replace("-", "_"), ""))
                      for name, n, ms in row["top"]]
        rows.append(row)
        print(f"batch {batch}: {row['kernels_per_step']:.0f} kernels a decode step, {row['kernel_ms_per_step']:.2f} ms "
              f"in them, {row['wall_ms_per_step']:.2f} ms wall; its {step_bytes / 1e6:.1f} MB take "
              f"{floor_ms:.2f} ms at {peaks.bandwidth_gb_s:.1f} GB/s, so {row['above_floor_ms']:.2f} ms "
              f"({row['above_floor_ms'] / row['wall_ms_per_step']:.0%}) is not spent moving bytes", flush=True)
        for name, count, ms, origin in row["top"]:
            print(f"    {ms:8.3f} ms  {count:6.1f} x  {name[:60]}  {origin[-100:]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peaks": vars(peaks), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
