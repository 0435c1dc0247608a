"""Offline generation with LLM: greedy and sampled, raw and chat-templated.

    .venv/bin/python examples/generate.py [--model-path PATH]
"""

import argparse

from maxlike.entrypoints import LLM
from maxlike.entrypoints.llm import default_model_path
from maxlike.interfaces import SamplingParams
from maxlike.pipelines import PipelineConfig

ap = argparse.ArgumentParser()
ap.add_argument("--model-path", default=None)
args = ap.parse_args()

llm = LLM(PipelineConfig(model_path=args.model_path or default_model_path(), max_length=256, max_batch_size=4))
for text in llm.generate(["The capital of France is", "def add(a, b):"], max_new_tokens=24):
    print(repr(text))
for text in llm.generate(["Name three colors."], max_new_tokens=32, chat=True,
                         sampling_params=SamplingParams(temperature=0.7, top_p=0.9, seed=0)):
    print(repr(text))
