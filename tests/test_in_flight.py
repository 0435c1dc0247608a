"""In-flight batching: one-token rows and a prompt chunk run as one step (a mixed step).

The mixed step lays its tokens flat, replica by replica, and attends per group
(graphs.attention.GroupedPageTable); every row's logits must equal HF's for the same
tokens, on one device and on two data-parallel replicas (fake CPU devices).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import build_model, held, random_prompt

HERE = os.path.dirname(__file__)


def _hf_next_logits(hf, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf(torch.tensor([list(ids)])).logits[0, -1].numpy()


def _append(ctx, token: int) -> None:
    """What committing a sampled token does: the pending tokens become [token]."""
    ctx.cache_length = len(ctx.tokens)
    ctx.tokens = np.append(ctx.tokens, np.int32(token))


@pytest.mark.parametrize("scan", [False, True])
def test_a_mixed_step_matches_hf(tiny_models, scan):
    from maxlike.pipelines import TextContext

    path, hf = tiny_models["qwen2"]
    model = build_model(path, enable_in_flight_batching=True, scan_layers=scan)
    a, b, c = random_prompt(20, seed=1), random_prompt(37, seed=2), random_prompt(9, seed=3)
    ca, cc = held(model, TextContext("a", a, 64)), held(model, TextContext("c", c, 64))
    model.execute(model.prepare_initial_token_inputs([[ca, cc]]))  # a and c are decoding now
    cb = held(model, TextContext("b", b, 64))
    cb.chunk = 30
    seen = {"a": list(a), "b": [], "c": list(c)}
    for step, (ta, tc) in enumerate([(5, 7), (11, 13)]):
        _append(ca, ta)
        _append(cc, tc)
        seen["a"].append(ta)
        seen["c"].append(tc)
        seen["b"] = list(b[: cb.cache_length + len(cb.next_tokens)])
        inputs = model.prepare_initial_token_inputs([[ca, cb, cc]])
        chunk = 32 if step == 0 else 16  # 30 tokens, then the last 7, each padded to its bucket
        assert inputs.tokens.shape == (1, 3 + chunk), "flat: 2 one-token rows (padded to 3), then the chunk"
        assert inputs.row_ids == ("a", "c", None, "b")
        logits = np.asarray(model.execute(inputs).next_token_logits)
        for rid, ids in seen.items():
            err = np.abs(logits[inputs.row_ids.index(rid)] - _hf_next_logits(hf, ids)).max()
            assert err < 1e-4, f"step {step}, row {rid}: logits differ from HF by {err}"
        cb.cache_length += len(cb.next_tokens)
        cb.chunk = None


def test_mixed_steps_need_last_token_logits_only(tiny_llama):
    from maxlike.config import ConfigError

    with pytest.raises(ConfigError, match="cannot be combined with enable_echo"):
        build_model(tiny_llama[0], enable_in_flight_batching=True, return_logits="all")


REPLICAS_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    sys.path.insert(0, sys.argv[1])
    import numpy as np, torch, transformers
    from conftest import random_prompt
    from maxlike.entrypoints import LLM
    from maxlike.pipelines import PipelineConfig, TextContext

    path = sys.argv[2]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = LLM(PipelineConfig(model_path=path, max_length=64, max_batch_size=4, dtype="float32", devices="4",
                               data_parallel_degree=2, tensor_parallel_degree=2, enable_in_flight_batching=True),
                progress=False).pipeline.model
    ctxs = {n: TextContext(n, random_prompt(k, seed=k), 64) for n, k in (("a", 6), ("b", 11), ("c", 14))}
    for name, replica in (("a", 0), ("b", 0), ("c", 1)):
        model.kv_manager.claim(name, replica=replica, total_tokens=64)
    model.execute(model.prepare_initial_token_inputs([[ctxs["a"], ctxs["b"]], [ctxs["c"]]]))
    for ctx, token in zip(ctxs.values(), (4, 5, 6)):
        ctx.cache_length = len(ctx.tokens)
        ctx.tokens = np.append(ctx.tokens, np.int32(token))
    ctxs["d"] = TextContext("d", random_prompt(20, seed=20), 64)  # a prompt chunk on each replica
    ctxs["e"] = TextContext("e", random_prompt(25, seed=25), 64)
    model.kv_manager.claim("d", replica=0, total_tokens=64)
    model.kv_manager.claim("e", replica=1, total_tokens=64)
    inputs = model.prepare_initial_token_inputs([[ctxs["a"], ctxs["d"], ctxs["b"]], [ctxs["e"], ctxs["c"]]])
    logits = np.asarray(model.execute(inputs).next_token_logits)
    errors = {}
    for name, ctx in ctxs.items():
        with torch.no_grad():
            ref = hf(torch.tensor([ctx.tokens.tolist()])).logits[0, -1].numpy()
        errors[name] = float(np.abs(logits[inputs.row_ids.index(name)] - ref).max())
    print(json.dumps(dict(errors=errors, shape=list(inputs.tokens.shape), rows=list(inputs.row_ids))))
""")


@pytest.mark.slow  # `make test-slow` (the fast suite must stay under 15 minutes)
def test_a_mixed_step_on_two_replicas_matches_hf(eight_head_models):
    r = subprocess.run([sys.executable, "-c", REPLICAS_SCRIPT, HERE, eight_head_models["llama"]],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    # Per replica: 2 one-token rows (replica 0 has a and b, replica 1 has c) padded to 3, then a chunk of 32.
    assert report["shape"] == [2, 3 + 32]
    assert report["rows"] == ["a", "b", None, "d", "c", None, None, "e"]
    assert max(report["errors"].values()) < 1e-4, report["errors"]
