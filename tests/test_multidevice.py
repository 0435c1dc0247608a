"""Sharding on fake CPU devices (own processes: XLA flags must precede jax's import).

Tensor parallel 2/4/8 and data 2 x tensor 2 give one device's greedy tokens and
logits; the compiled step all-reduces activations and never all-gathers a whole
weight; two processes form one mesh through jax.distributed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import free_port

HERE = os.path.dirname(__file__)

MESH_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, sys.argv[1])
    import jax, numpy as np
    from conftest import random_prompt
    from maxlike.entrypoints import LLM
    from maxlike.interfaces import SamplingParams
    from maxlike.pipelines import PipelineConfig, TextContext

    path, meshes = sys.argv[2], json.loads(sys.argv[3])
    prompts = [random_prompt(n, seed=n).tolist() for n in (5, 17, 9, 30)]
    report = {}
    for i, mesh in enumerate(meshes):  # [data, tensor, (1: layers as one loop), (1: fused), (encoding), (expert)]
        dp, tp, scan, fuse = mesh[0], mesh[1], bool(mesh[2:3] and mesh[2]), bool(mesh[3:4] and mesh[3])
        encoding = mesh[4] if len(mesh) > 4 else None
        ep = mesh[5] if len(mesh) > 5 else 1
        label = (f"{dp}x{tp}" + (f"-expert{ep}" if ep > 1 else "") + ("-scan" if scan else "")
                 + ("-fused" if fuse else "") + (f"-{encoding}" if encoding else "")
                 + ("-again" if mesh in meshes[:i] else ""))
        llm = LLM(PipelineConfig(model_path=path, max_length=128, max_batch_size=4, devices=str(dp * tp * ep),
                                 data_parallel_degree=dp, tensor_parallel_degree=tp, expert_parallel_degree=ep,
                                 scan_layers=scan, fuse_projections=fuse, quantization_encoding=encoding),
                  progress=False)
        outs = llm.generate_outputs(prompts, sampling_params=SamplingParams(top_k=1, max_new_tokens=8, ignore_eos=True),
                                    use_tqdm=False)
        drawn = None  # seeded draws where rows are split over replicas (the sampler and its penalty state per replica)
        if dp > 1 or tp == 1:
            drawn = [o.token_ids for o in llm.generate_outputs(prompts, sampling_params=SamplingParams(
                temperature=0.9, top_p=0.95, seed=7, max_new_tokens=8, ignore_eos=True, repetition_penalty=1.2,
                frequency_penalty=0.5, min_p=0.05), use_tqdm=False)]
        model = llm.pipeline.model
        # One prefill step over all prompts, spread over the replicas, for the logits.
        ctxs = [TextContext(f"x{i}", p, 40) for i, p in enumerate(prompts)]
        batches = [ctxs[r::dp] for r in range(dp)]
        for r, b in enumerate(batches):
            for c in b:
                model.kv_manager.claim(c.request_id, replica=r, total_tokens=c.max_length)
        out = model.execute(model.prepare_initial_token_inputs(batches))
        per = out.next_token_logits.shape[0] // dp
        rows = {c.request_id: r * per + j for r, b in enumerate(batches) for j, c in enumerate(b)}
        logits = np.asarray(out.next_token_logits)[[rows[c.request_id] for c in ctxs]]
        hlo = model.session.executables("step")[0].as_text()
        gathers = [line.split("=")[1].split()[0] for line in hlo.splitlines() if " all-gather(" in line]
        shapes = [(a.dtype, a.shape) for a in model.params.values()]
        shapes += [(a.dtype, a.shape[1:]) for n, a in model.params.items() if scan and n.startswith("layers.")]
        hlo_types = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "uint8": "u8", "int8": "s8"}
        weights = sorted({hlo_types.get(str(d), str(d)) + str(list(s)).replace(" ", "") for d, s in shapes})
        stats = model.session.stats
        report[label] = dict(compiled=stats.compiled, loaded=stats.loaded,
            tokens=[o.token_ids for o in outs], drawn=drawn, logits=logits.tolist(), all_reduce=hlo.count(" all-reduce("),
            gathered_weights=[g for g in gathers if any(g.startswith(w) for w in weights)],  # a layer's slice too
            pool=list(model.kv_manager.pool[0][0].shape), mesh=dict(model.session.mesh.shape),
            buffers=len(model.signal_buffers))
    print(json.dumps(report))
""")


def _run_meshes(path, meshes):
    r = subprocess.run([sys.executable, "-c", MESH_SCRIPT, HERE, path, json.dumps(meshes)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# Llama covers 4-way tensor parallel (KV heads repeated, q/k/v and gate/up fused) and data x tensor 2x2 with
# the layers as one loop in the fast suite; Qwen2 (tied embeddings, qkv bias) adds 8-way, a plain 2-way (seen
# again) and a plain 2x2, unfused, in `make test-slow`.
@pytest.mark.parametrize("kind,meshes", [("llama", [[1, 1], [1, 4, 0, 1], [2, 2, 1], [2, 2, 1]]),
                                         pytest.param("qwen2", [[1, 1], [1, 2], [1, 8], [2, 2], [1, 2]],
                                                      marks=pytest.mark.slow)])  # about 20 s: `make test-slow`
def test_tensor_and_data_parallel_equal_one_device(eight_head_models, kind, meshes):
    import numpy as np

    report = _run_meshes(eight_head_models[kind], meshes)
    seen = next(name for name in report if name.endswith("-again"))  # the executable cache: a mesh seen
    again = report.pop(seen)  # before loads, a new mesh compiles
    assert again["compiled"] == 0 and again["loaded"] > 0 and again["tokens"] == report[seen[:-6]]["tokens"]
    assert all(r["loaded"] == 0 and r["compiled"] > 0 for r in report.values()), "another mesh missed the cache"
    one = report.pop("1x1")
    assert one["buffers"] == 0
    for name, r in report.items():
        assert r["tokens"] == one["tokens"], f"{name}: greedy tokens differ from one device"
        assert r["drawn"] in (None, one["drawn"]), f"{name}: seeded draws differ from one device"
        err = float(np.abs(np.asarray(r["logits"]) - np.asarray(one["logits"])).max())
        assert err < 1e-5, f"{name}: logits differ by {err}"
        assert r["all_reduce"] > 0, f"{name}: the sharded step has no all-reduce"
        assert r["gathered_weights"] == [], f"{name}: the step all-gathers whole weights {r['gathered_weights']}"
        dp, tp = (int(x) for x in name.split("-")[0].split("x"))
        assert r["mesh"] == {"data": dp, "expert": 1, "tensor": tp} and r["buffers"] == dp * tp
        assert r["pool"][0] == dp and r["pool"][4] == max(2, tp), "a KV pool per replica, KV heads repeated to tp"


@pytest.mark.slow  # `make test-slow` (the fast suite must stay under 15 minutes)
def test_quantized_weights_split_like_float_ones(eight_head_models):
    """q4_k (4-bit values packed along the inputs, a scale and offset per 32 inputs) on tensor 2
    (the o and down projections' inputs split too: 32 of o's 64 per device, one group) and data x
    tensor 2 x 2 with the layer loop and fused projections: the same tokens and logits as on one
    device, no weight all-gathered. (Tensor 4 would leave 16 of o's inputs per device: refused,
    tests/test_tpu_target.py.)"""
    import numpy as np

    report = _run_meshes(eight_head_models["llama"], [[1, 1, 0, 0, "q4_k"], [1, 2, 0, 0, "q4_k"],
                                                      [2, 2, 1, 1, "q4_k"]])
    one = report.pop("1x1-q4_k")
    for name, r in report.items():
        assert r["tokens"] == one["tokens"], name
        assert float(np.abs(np.asarray(r["logits"]) - np.asarray(one["logits"])).max()) < 1e-5, name
        assert r["gathered_weights"] == [], f"{name}: the step all-gathers whole weights {r['gathered_weights']}"


HOST_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    sys.path.insert(0, sys.argv[1])
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from conftest import random_prompt
    from maxlike.entrypoints import LLM
    from maxlike.interfaces import SamplingParams
    from maxlike.pipelines import PipelineConfig

    path, port, pid, nproc = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    multi = dict(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid) if nproc > 1 else {}
    cache = os.environ.get("HOST_TEST_CACHE")  # conftest sets MAXLIKE_CACHE_DIR to a new folder per process
    llm = LLM(PipelineConfig(model_path=path, max_length=128, max_batch_size=4, tensor_parallel_degree=4,
                             cache_dir=cache, **multi), progress=False)
    prompts = [random_prompt(n, seed=n).tolist() for n in (5, 17, 9)]
    outs = llm.generate_outputs(prompts, sampling_params=SamplingParams(top_k=1, max_new_tokens=8, ignore_eos=True,
                                                                        repetition_penalty=1.3), use_tqdm=False)
    stats = llm.pipeline.model.session.stats
    print(json.dumps(dict(tokens=[o.token_ids for o in outs], devices=len(jax.devices()),
                          local=len(jax.local_devices()), process=jax.process_index(), compiled=stats.compiled,
                          loaded=stats.loaded)))
""")


def _two_processes(path: str, env: dict) -> list[dict]:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", HOST_SCRIPT, HERE, path, str(port), str(i), "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.slow  # about 30 s: `make test-slow` (multi-host serving there too)
def test_two_processes_form_one_mesh(eight_head_models, tmp_path):
    path, env = eight_head_models["llama"], dict(os.environ, HOST_TEST_CACHE=str(tmp_path))
    results = _two_processes(path, env)
    single = subprocess.run([sys.executable, "-c", HOST_SCRIPT.replace("count=2", "count=4"), HERE, path, "0", "0",
                             "1"], capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    alone = json.loads(single.stdout.strip().splitlines()[-1])
    assert [r["devices"] for r in results] == [4, 4] and [r["local"] for r in results] == [2, 2]
    assert [r["process"] for r in results] == [0, 1]
    assert results[0]["tokens"] == results[1]["tokens"] == alone["tokens"]
    # A warm start of the same job: every process loads the mesh-wide executables, compiles nothing.
    warm = _two_processes(path, env)
    assert [(r["compiled"], r["loaded"] > 0) for r in warm] == [(0, True), (0, True)]
    assert warm[0]["tokens"] == warm[1]["tokens"] == alone["tokens"]


def test_bad_meshes_are_named_before_loading(tiny_llama):
    from maxlike.config import ConfigError
    from maxlike.engine.mesh import plan_mesh
    from maxlike.entrypoints import LLM
    from maxlike.pipelines import PipelineConfig

    with pytest.raises(ConfigError, match=r"devices='4' asks for 4 devices but 1 cpu device\(s\) are present"):
        LLM(PipelineConfig(model_path=tiny_llama[0], devices="4"), progress=False)
    with pytest.raises(ConfigError, match="tensor_parallel_degree=2 does not divide the 1 selected devices"):
        LLM(PipelineConfig(model_path=tiny_llama[0], tensor_parallel_degree=2), progress=False)
    sizes = dict(q_heads=4, kv_heads=2, vocab=320, intermediate=128)
    with pytest.raises(ConfigError, match=r"its 4 attention heads do not split 3 ways. Degrees that fit: \[1\]"):
        plan_mesh([None] * 3, None, 3, **sizes)
    with pytest.raises(ConfigError, match="data_parallel_degree=2 x tensor_parallel_degree=2 needs 4 devices"):
        plan_mesh([None] * 8, 2, 2, **sizes)
    assert plan_mesh([None] * 8, None, None, **sizes) == (2, 1, 4)  # widest split the heads allow, rest replicas
    assert plan_mesh([None] * 3, None, None, **sizes) == (3, 1, 1)
    with pytest.raises(ConfigError, match="coordinator_address, num_processes and process_id together"):
        PipelineConfig(model_path=tiny_llama[0], coordinator_address="127.0.0.1:1")


def test_unreachable_coordinator_fails_in_bounded_time(tiny_llama):
    import time

    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        from maxlike.config import ConfigError
        from maxlike.entrypoints import LLM
        from maxlike.pipelines import PipelineConfig
        try:
            LLM(PipelineConfig(model_path=sys.argv[2], coordinator_address="127.0.0.1:" + sys.argv[3],
                               num_processes=2, process_id=1, coordinator_timeout_s=5), progress=False)
        except ConfigError as e:
            print("ConfigError:", e)
    """)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", script, HERE, tiny_llama[0], str(free_port())],
                       capture_output=True, text=True, timeout=120)
    assert "ConfigError: could not join the multi-host job" in r.stdout, r.stderr[-2000:]
    assert "within 5s" in r.stdout and time.perf_counter() - t < 90
