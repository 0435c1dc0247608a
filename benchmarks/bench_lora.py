"""LoRA decode cost: tokens/s of one batch with no adapter, every row on one adapter, and rows
spread over 4 adapters, against the same model without LoRA, in one run.

    .venv/bin/python benchmarks/bench_lora.py [--batch 8] [--rank 16] [--json out.json]

SmolLM2-135M (the embedded default) by default; the adapters are random PEFT folders (rank
--rank, every projection of every layer) written for the model's shapes. Each setting runs a
short untimed pass (compiles), then --repeats rounds in which every setting makes one timed
pass of --batch prompts of 16 tokens, --new-tokens tokens each (greedy, EOS ignored). Both LLMs
stay loaded and the settings take turns, so a slow spell of the machine hits all of them alike;
each setting reports its median and best pass, and the ratios use the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from maxlike.entrypoints import LLM  # noqa: E402
from maxlike.entrypoints.llm import default_model_path  # noqa: E402
from maxlike.interfaces import SamplingParams  # noqa: E402
from maxlike.pipelines import PipelineConfig  # noqa: E402

MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def write_adapter(folder: str, hf, rank: int, seed: int) -> None:
    """A random PEFT LoRA folder for a Llama-shaped model with HF config `hf`."""
    from safetensors.numpy import save_file

    d, heads, kv = hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads
    hd = getattr(hf, "head_dim", None) or d // heads
    shapes = {"q_proj": (d, heads * hd), "k_proj": (d, kv * hd), "v_proj": (d, kv * hd), "o_proj": (heads * hd, d),
              "gate_proj": (d, hf.intermediate_size), "up_proj": (d, hf.intermediate_size),
              "down_proj": (hf.intermediate_size, d)}
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(hf.num_hidden_layers):
        for module, (n_in, n_out) in shapes.items():
            base = f"base_model.model.model.layers.{layer}.{MODULES[module]}.{module}"
            tensors[base + ".lora_A.weight"] = rng.normal(0, 0.02, (rank, n_in)).astype(np.float32)
            tensors[base + ".lora_B.weight"] = rng.normal(0, 0.02, (n_out, rank)).astype(np.float32)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(shapes),
                   "bias": "none"}, f)


def one_pass(llm: LLM, prompts, lora, new_tokens: int) -> float:
    params = SamplingParams(top_k=1, ignore_eos=True, max_new_tokens=new_tokens)
    t = time.perf_counter()
    outs = llm.generate_outputs(prompts, sampling_params=params, lora=lora, use_tqdm=False)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    path = args.model_path or default_model_path()
    common = dict(model_path=path, max_length=128, max_batch_size=args.batch)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 40000, size=16).tolist() for _ in range(args.batch)]
    results = {"config": vars(args)}
    plain = LLM(PipelineConfig(**common), progress=False)
    hf = plain.pipeline.model.huggingface_config
    with tempfile.TemporaryDirectory() as tmp:
        specs = []
        for i in range(4):
            write_adapter(os.path.join(tmp, f"a{i}"), hf, args.rank, seed=i)
            specs.append(f"a{i}={os.path.join(tmp, f'a{i}')}")
        lora_llm = LLM(PipelineConfig(**common, enable_lora=True, lora_paths=tuple(specs), max_lora_rank=args.rank,
                                      max_num_loras=4), progress=False)
        settings = {"no_lora": (plain, None), "lora_on_base_rows": (lora_llm, None), "one_adapter": (lora_llm, "a0"),
                    "four_adapters": (lora_llm, [f"a{i % 4}" for i in range(args.batch)])}
        for llm, lora in settings.values():
            one_pass(llm, prompts, lora, args.new_tokens)  # compiles
        passes = {label: [] for label in settings}
        for _ in range(args.repeats):
            for label, (llm, lora) in settings.items():
                passes[label].append(one_pass(llm, prompts, lora, args.new_tokens))
    base = float(np.median(passes["no_lora"]))
    for label, rates in passes.items():
        med = float(np.median(rates))
        results[label] = {"median": med, "best": max(rates), "passes": rates, "ratio_of_medians": med / base}
        print(f"{label}: median {med:.1f} tok/s, best {max(rates):.1f} ({med / base:.3f}x LoRA off)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
