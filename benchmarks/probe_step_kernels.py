"""How many kernels does one decode step launch? SmolLM2's (30 layers) compiled batch-1 decode loop,
counted from its optimized HLO: the instructions that run as a kernel each (fusions, dots, custom
calls, copies, scatters...; parameters, tuples and bitcasts cost nothing) in the entry computation,
the loops' bodies (the step loop, and the layer loop with scan) and one branch of each conditional,
sampling included, per layer form and fusion setting.

    .venv/bin/python benchmarks/probe_step_kernels.py [--platform-note cpu]

On GPU each counted instruction is about one kernel launch; XLA:CPU runs them as loops in one
thread pool, so there the count measures the graph, not launch overhead.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

FREE = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "after-all", "partition-id",
        "replica-id", "opt-barrier"}


def kernels(hlo: str) -> collections.Counter:
    """Opcode counts of the instructions in the ENTRY computation, in while-loop bodies and in the
    first branch of each conditional (a step runs one branch)."""
    counts: collections.Counter = collections.Counter()
    body_names = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    body_names |= set(re.findall(r"branch_computations=\{%?([\w.\-]+)", hlo))
    current, keep = None, False
    for line in hlo.splitlines():
        header = re.match(r"^(ENTRY )?%?([\w.\-]+) \(", line)
        if header:
            current = header.group(2)
            keep = bool(header.group(1)) or current in body_names
            continue
        if not keep or "=" not in line or line.strip().startswith("}"):
            continue
        m = re.search(r"=\s*[^ ]+\s+([a-z\-]+)\(", line)
        if m and m.group(1) not in FREE:
            counts[m.group(1)] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    import numpy as np

    from maxlike.entrypoints import LLM
    from maxlike.entrypoints.llm import default_model_path
    from maxlike.interfaces import SamplingParams
    from maxlike.pipelines import PipelineConfig

    rows = []
    for scan in (False, True):
        for fuse in (False, True):
            llm = LLM(PipelineConfig(model_path=default_model_path(), max_length=256, max_batch_size=1,
                                     scan_layers=scan, fuse_projections=fuse), progress=False)
            llm.generate_outputs([np.arange(3, 20).tolist()], sampling_params=SamplingParams(
                top_k=1, max_new_tokens=4, ignore_eos=True), use_tqdm=False)
            model = llm.pipeline.model
            [loop] = model.session.executables("decode_loop")  # decode steps run in it (sampling included)
            counts = kernels(loop.as_text())
            row = {"layers": "scan" if scan else "unrolled", "fused": fuse, "kernels": sum(counts.values()),
                   "by_opcode": dict(counts.most_common(8))}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del llm, model, loop
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
