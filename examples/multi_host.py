"""One model over several hosts (jax.distributed): run this once per process.

    # two processes on one machine, two fake CPU devices each, one 4-device mesh:
    .venv/bin/python examples/multi_host.py --process-id 0 --num-processes 2 &
    .venv/bin/python examples/multi_host.py --process-id 1 --num-processes 2

On real hosts pass `--coordinator-address host0:port` (the address of process 0)
and drop `--fake-cpu-devices`. Every process runs the same requests in the same
order (the scheduler is deterministic), feeds its own devices' shards, and only
process 0 prints. The CLI takes the same flags: `maxlike generate
--coordinator-address ... --num-processes ... --process-id ...`.
"""

import argparse
import os

ap = argparse.ArgumentParser()
ap.add_argument("--model-path", default=None)
ap.add_argument("--coordinator-address", default="127.0.0.1:12355")
ap.add_argument("--num-processes", type=int, required=True)
ap.add_argument("--process-id", type=int, required=True)
ap.add_argument("--fake-cpu-devices", type=int, default=2)
args = ap.parse_args()
if args.fake_cpu_devices:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.fake_cpu_devices}"

import jax  # noqa: E402

from maxlike.entrypoints import LLM  # noqa: E402
from maxlike.entrypoints.llm import default_model_path  # noqa: E402
from maxlike.pipelines import PipelineConfig  # noqa: E402

llm = LLM(PipelineConfig(model_path=args.model_path or default_model_path(), max_length=256, max_batch_size=4,
                         coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                         process_id=args.process_id), progress=args.process_id == 0)
texts = llm.generate(["The capital of France is", "def add(a, b):"], max_new_tokens=16, use_tqdm=False)
if jax.process_index() == 0:
    print(f"mesh {dict(llm.pipeline.model.session.mesh.shape)} over {jax.device_count()} devices "
          f"in {jax.process_count()} processes")
    for text in texts:
        print(repr(text))
