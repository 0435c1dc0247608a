"""Decode cost of logit processors and structured output: tokens/s with no row penalised, every row
penalised (repetition, frequency and presence penalties, a logit bias, min_new_tokens), greedy and
sampled, and every row under a JSON schema (with the host's mask time per token), in one run.

    .venv/bin/python benchmarks/bench_sampling_params.py [--batch 1 8] [--json out.json]
    .venv/bin/python benchmarks/bench_sampling_params.py --repo /path/to/older/checkout --only plain

SmolLM2-135M (the embedded default). One LLM per batch size; each setting runs an untimed pass
(compiles), then --repeats rounds in which every setting makes one timed pass of `batch` prompts of
16 tokens, --new-tokens each (EOS ignored); the settings take turns so a slow spell of the machine
hits all of them. Medians are reported. `--repo` imports maxlike from another checkout (e.g. main
before logit processors existed) to time its plain settings the same way.
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
ap.add_argument("--repo", default=os.path.join(os.path.dirname(__file__), ".."))
ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
ap.add_argument("--new-tokens", type=int, default=64)
ap.add_argument("--repeats", type=int, default=5)
ap.add_argument("--only", choices=["plain", "all"], default="all")
ap.add_argument("--json", default=None)
args = ap.parse_args()
sys.path.insert(0, os.path.abspath(args.repo))

from maxlike.entrypoints import LLM  # noqa: E402
from maxlike.entrypoints.llm import default_model_path  # noqa: E402
from maxlike.interfaces import SamplingParams  # noqa: E402
from maxlike.pipelines import PipelineConfig  # noqa: E402

JSON = {"type": "json_schema", "json_schema": {"schema": {  # long enough to use every new token
    "type": "object", "properties": {"story": {"type": "string", "minLength": 400}}, "required": ["story"]}}}
PENALTIES = dict(repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.3, min_new_tokens=8,
                 logit_bias={13: -2.0, 28: 1.5})


def settings(n: int) -> dict[str, SamplingParams]:
    base = dict(ignore_eos=True, max_new_tokens=n)
    out = {"greedy": SamplingParams(top_k=1, **base),
           "sampled (T 0.8, top-p 0.95)": SamplingParams(temperature=0.8, top_p=0.95, seed=1, **base)}
    if args.only == "all":
        out["greedy, all penalties"] = SamplingParams(top_k=1, **base, **PENALTIES)
        out["sampled, all penalties"] = SamplingParams(temperature=0.8, top_p=0.95, seed=1, **base, **PENALTIES)
        out["sampled, JSON schema"] = SamplingParams(temperature=0.8, top_p=0.95, seed=1, response_format=JSON, **base)
    return out


def one_pass(llm, prompts, params) -> float:
    t = time.perf_counter()
    outs = llm.generate_outputs(prompts, sampling_params=params, use_tqdm=False)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)


def main() -> None:
    path = default_model_path()
    rng = np.random.default_rng(0)
    results = {"config": vars(args)}
    for batch in args.batch:
        llm = LLM(PipelineConfig(model_path=path, max_length=128, max_batch_size=batch), progress=False)
        prompts = [rng.integers(3, 40000, size=16).tolist() for _ in range(batch)]
        kinds = settings(args.new_tokens)
        masks = [0.0, 0]  # host seconds filling token masks, masks filled
        grammars = getattr(llm.pipeline, "grammars", None)
        if grammars is not None:
            fill = grammars.fill

            def timed(matchers, rows, fill=fill):
                t = time.perf_counter()
                out = fill(matchers, rows)
                masks[0] += time.perf_counter() - t
                masks[1] += len(matchers)
                return out

            grammars.fill = timed
        for params in kinds.values():
            one_pass(llm, prompts, params)  # compiles
        passes = {name: [] for name in kinds}
        for _ in range(args.repeats):
            for name, params in kinds.items():
                passes[name].append(one_pass(llm, prompts, params))
        results[f"batch {batch}"] = {name: {"median": statistics.median(r), "passes": r} for name, r in passes.items()}
        for name, r in passes.items():
            print(f"batch {batch:2d}  {name:28s} median {statistics.median(r):7.1f} tok/s  "
                  f"(min {min(r):.1f}, max {max(r):.1f})", flush=True)
        if masks[1]:
            results[f"batch {batch}"]["mask_us_per_token"] = masks[0] / masks[1] * 1e6
            print(f"batch {batch:2d}  host mask time {masks[0] / masks[1] * 1e6:.1f} us per constrained token")
        del llm
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
