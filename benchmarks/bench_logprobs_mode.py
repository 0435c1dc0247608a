"""Decode cost of log-probabilities per `logprobs_mode`: tokens/s of sampled requests (T 0.8, top-p 0.95)
without logprobs, and with top-5 logprobs under raw_logprobs and processed_logprobs, in one run.

    .venv/bin/python benchmarks/bench_logprobs_mode.py [--batch 1 8] [--json out.json]

SmolLM2-135M (the embedded default). Two LLMs per batch size (the mode is pipeline-wide); every
setting makes an untimed pass (compiles), then --repeats rounds in which each makes one timed pass
of `batch` prompts of 16 tokens, --new-tokens each (EOS ignored), taking turns. Medians reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
ap.add_argument("--new-tokens", type=int, default=64)
ap.add_argument("--repeats", type=int, default=5)
ap.add_argument("--json", default=None)
args = ap.parse_args()
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from maxlike.entrypoints import LLM  # noqa: E402
from maxlike.entrypoints.llm import default_model_path  # noqa: E402
from maxlike.interfaces import SamplingParams  # noqa: E402
from maxlike.pipelines import PipelineConfig  # noqa: E402


def main() -> None:
    path = default_model_path()
    rng = np.random.default_rng(0)
    results = {"config": vars(args)}
    base = dict(temperature=0.8, top_p=0.95, seed=1, ignore_eos=True, max_new_tokens=args.new_tokens)
    for batch in args.batch:
        llms = {mode: LLM(PipelineConfig(model_path=path, max_length=128, max_batch_size=batch, logprobs_mode=mode),
                          progress=False) for mode in ("raw_logprobs", "processed_logprobs")}
        settings = {"no logprobs": (llms["raw_logprobs"], SamplingParams(**base)),
                    "top-5 raw_logprobs": (llms["raw_logprobs"], SamplingParams(logprobs=5, **base)),
                    "top-5 processed_logprobs": (llms["processed_logprobs"], SamplingParams(logprobs=5, **base))}
        prompts = [rng.integers(3, 40000, size=16).tolist() for _ in range(batch)]

        def one_pass(llm, params) -> float:
            t = time.perf_counter()
            outs = llm.generate_outputs(prompts, sampling_params=params, use_tqdm=False)
            return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)

        for llm, params in settings.values():
            one_pass(llm, params)  # compiles
        passes = {name: [] for name in settings}
        for _ in range(args.repeats):
            for name, (llm, params) in settings.items():
                passes[name].append(one_pass(llm, params))
        results[f"batch {batch}"] = {name: {"median": statistics.median(r), "passes": r} for name, r in passes.items()}
        for name, r in passes.items():
            print(f"batch {batch:2d}  {name:26s} median {statistics.median(r):7.1f} tok/s  "
                  f"(min {min(r):.1f}, max {max(r):.1f})", flush=True)
        del llms, settings
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
