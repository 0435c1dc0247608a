"""MAX's step loop written out: prepare_initial -> execute -> sample -> prepare_next.

    .venv/bin/python examples/pipeline_model.py [--model-path PATH] [--prompt TEXT]
"""

import argparse

import jax.numpy as jnp

from maxlike.entrypoints.llm import default_model_path
from maxlike.pipelines import PIPELINE_REGISTRY, PipelineConfig, TextContext

ap = argparse.ArgumentParser()
ap.add_argument("--model-path", default=None)
ap.add_argument("--prompt", default="The three primary colors are")
ap.add_argument("--new-tokens", type=int, default=16)
args = ap.parse_args()

config = PipelineConfig(model_path=args.model_path or default_model_path(), max_length=256, max_batch_size=1)
tokenizer, pipeline = PIPELINE_REGISTRY.retrieve(config)
model = pipeline.model  # a PipelineModel
print("weights:", model.estimate_weights_size(config), "bytes; dtype:", model.dtype)

prompt = tokenizer.encode(args.prompt)
ctx = TextContext("example", prompt, max_length=len(prompt) + args.new_tokens)
model.kv_manager.claim(ctx.request_id, total_tokens=ctx.max_length)  # KV pages for the whole sequence
inputs = model.prepare_initial_token_inputs([[ctx]])  # pads to buckets, one transfer to the device
generated = []
for _ in range(args.new_tokens):
    outputs = model.execute(inputs)  # compiled step; the KV pool is donated and updated
    next_tokens = jnp.argmax(outputs.next_token_logits, axis=-1).astype(jnp.int32)  # greedy, on device
    generated.append(next_tokens)
    inputs = model.prepare_next_token_inputs(next_tokens, inputs)
model.kv_manager.release("example")
print(args.prompt + tokenizer.decode([int(t[0]) for t in generated]))
print("compiles:", model.session.stats.as_dict())
