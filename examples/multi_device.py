"""One job over several devices: tensor parallel within a replica, data parallel across, and
for a mixture-of-experts model (Mixtral, Qwen3-MoE) its experts split too.

    .venv/bin/python examples/multi_device.py [--model-path PATH] [--fake-cpu-devices 4]
        [--data-parallel-degree 2] [--tensor-parallel-degree 2] [--expert-parallel-degree 2]

On a CPU-only machine `--fake-cpu-devices N` splits the CPU into N XLA devices
(the same code runs unchanged on N GPUs). Defaults: every device, the widest
tensor split the model's heads allow, the rest as replicas.
"""

import argparse
import os

ap = argparse.ArgumentParser()
ap.add_argument("--model-path", default=None)
ap.add_argument("--fake-cpu-devices", type=int, default=4)
ap.add_argument("--data-parallel-degree", type=int, default=None)
ap.add_argument("--tensor-parallel-degree", type=int, default=None)
ap.add_argument("--expert-parallel-degree", type=int, default=None)
args = ap.parse_args()
if args.fake_cpu_devices:  # must be set before jax starts
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.fake_cpu_devices}"

from maxlike.entrypoints import LLM  # noqa: E402
from maxlike.entrypoints.llm import default_model_path  # noqa: E402
from maxlike.pipelines import PipelineConfig  # noqa: E402

llm = LLM(PipelineConfig(model_path=args.model_path or default_model_path(), max_length=256, max_batch_size=4,
                         data_parallel_degree=args.data_parallel_degree,
                         tensor_parallel_degree=args.tensor_parallel_degree,
                         expert_parallel_degree=args.expert_parallel_degree))
mesh = llm.pipeline.model.session.mesh
print(f"mesh: {dict(mesh.shape)} over {mesh.devices.size} devices")
prompts = ["The capital of France is", "def add(a, b):", "Once upon a time", "1, 2, 3,"]
for prompt, text in zip(prompts, llm.generate(prompts, max_new_tokens=16, use_tqdm=False)):
    print(f"{prompt!r} -> {text!r}")
