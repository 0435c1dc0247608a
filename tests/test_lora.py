"""LoRA adapters against HF + peft (torch CPU, fp32): logits, greedy tokens, mixed batches,
slots and eviction, and the errors a bad adapter gets."""

from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import build_model, random_prompt

TOL = 1e-4
# Two adapters per base model: different ranks and targets, one with rslora.
ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
    "b": dict(r=8, lora_alpha=4, use_rslora=True,
              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}


def make_adapter(hf, folder, seed: int, **lora_kw):
    """A PEFT LoRA adapter of `hf` with random, non-zero A and B, saved to `folder`; returns
    the peft model (the reference)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(lora_dropout=0.0, **lora_kw)).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(str(folder))
    return peft_model


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    """kind -> (base path, base HF model, {adapter name: (folder, peft model)})."""
    out = {}
    for kind in ("llama", "qwen2"):
        path, hf = tiny_models[kind]
        made = {}
        for i, (name, kw) in enumerate(ADAPTERS.items()):
            folder = tmp_path_factory.mktemp(f"{kind}-lora-{name}")
            made[name] = (str(folder), make_adapter(hf, folder, seed=10 + i, **kw))
        out[kind] = (path, hf, made)
    return out


def _llm(path, made, **kw):
    from maxlike.entrypoints import LLM
    from maxlike.pipelines import PipelineConfig

    kw = {"max_length": 64, "max_batch_size": 4, "dtype": "float32", "max_lora_rank": 8, "max_num_loras": 2, **kw}
    return LLM(PipelineConfig(model_path=path, enable_lora=True, lora_paths=tuple(f"{n}={f}" for n, (f, _) in
                                                                                 made.items()), **kw), progress=False)


def _hf_greedy(model, prompt, n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor(prompt[None], dtype=torch.long), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind,scan", [("llama", False), pytest.param("qwen2", True, marks=pytest.mark.slow)])
def test_each_adapter_matches_hf_peft(adapters, kind, scan):
    """Llama with its layers unrolled, Qwen2 with them as one loop (adapter slots stacked too)."""
    from maxlike.interfaces import SamplingParams
    from maxlike.pipelines import TextContext

    path, hf, made = adapters[kind]
    llm = _llm(path, made, scan_layers=scan)
    model = llm.pipeline.model
    assert model.scan_layers == scan
    assert model.lora_manager is not None and model.lora_manager.list_adapters() == ["a", "b"]
    prompt = random_prompt(13, seed=4)
    for name, (_, peft_model) in made.items():  # next-token logits after the prompt
        model.lora_manager.activate_adapter(name)
        ctx = TextContext(f"logits-{name}", prompt, 40, lora_name=name)
        model.kv_manager.claim(ctx.request_id, total_tokens=40)
        logits = np.asarray(model.execute(model.prepare_initial_token_inputs([[ctx]])).next_token_logits)[0]
        model.kv_manager.release(ctx.request_id)
        with torch.no_grad():
            ref = peft_model(torch.tensor(prompt[None], dtype=torch.long)).logits[0, -1].numpy()
            base = hf(torch.tensor(prompt[None], dtype=torch.long)).logits[0, -1].numpy()
        assert np.abs(ref - base).max() > 1e-2, "the adapter changes the output"
        err = np.abs(logits - ref).max()
        assert err < TOL, f"adapter {name}: logits differ from HF + peft by {err}"
    # One batch mixing the base model and both adapters: each row equals HF (+ peft) alone.
    params = SamplingParams(top_k=1, max_new_tokens=16, ignore_eos=True)
    prompts = [random_prompt(n, seed=n).tolist() for n in (5, 11, 8, 17)]
    names = [None, "a", "b", "a"]
    outs = llm.generate_outputs(prompts, sampling_params=params, lora=names, use_tqdm=False)
    for prompt, name, out in zip(prompts, names, outs):
        ref_model = hf if name is None else made[name][1]
        assert out.token_ids == _hf_greedy(ref_model, np.asarray(prompt), 16), f"row with adapter {name}"


def test_slots_evict_the_least_recently_used_idle_adapter_and_compile_nothing(adapters, tmp_path):
    from maxlike.config import ConfigError

    path, _, made = adapters["llama"]
    made = dict(made)
    third = tmp_path / "c"
    shutil.copytree(made["a"][0], third)
    llm = _llm(path, made, max_num_loras=2, warmup=True, forbid_compile=True, max_batch_size=2, max_length=32)
    lora = llm.pipeline.model.lora_manager
    assert lora.load_adapter(f"c={third}") == "c"
    prompt = random_prompt(6, seed=1).tolist()
    alone = {n: llm.generate_outputs([prompt], max_new_tokens=6, lora=n, use_tqdm=False)[0].token_ids
             for n in ("a", "b", "c", None)}  # 3 adapters through 2 slots: c evicted a, the least recent
    assert lora.slot_of("b") > 0 and lora.slot_of("c") > 0
    with pytest.raises(ConfigError, match="'a' is not in a device slot"):
        lora.slot_of("a")
    assert alone["c"] == alone["a"] != alone["b"] != alone[None]  # c is a copy of a
    assert llm.generate_outputs([prompt], max_new_tokens=6, lora="a", use_tqdm=False)[0].token_ids == alone["a"]
    # The decode loop reads the slots in place: no copy or transpose of a LoRA weight per step
    # (contracting slot and rank as two axes once made XLA:CPU copy every B weight each step).
    shapes = {tuple(a.shape) for a in lora.arrays.values()}
    shapes |= {tuple(a.shape[:-2]) + (a.shape[-1], a.shape[-2]) for a in lora.arrays.values()}
    shapes |= {s[:-3] + (s[-2], s[-3], s[-1]) for s in shapes if len(s) >= 3}
    loops = llm.pipeline.model.session.executables("decode_loop")
    assert loops
    copied = [line for exe in loops for line in exe.as_text().splitlines()
              if (" copy(" in line or " transpose(" in line)
              and any("[" + ",".join(map(str, s)) + "]" in line.split("=", 1)[-1].split("(")[0] for s in shapes)]
    assert not copied, copied[:3]
    lora.unload_adapter("c")
    assert lora.list_adapters() == ["a", "b"]
    with pytest.raises(ConfigError, match="unknown LoRA adapter 'c'; loaded"):
        lora.activate_adapter("c")


@pytest.mark.slow  # `make test-slow` (the fast suite must stay under 15 minutes)
def test_requests_wait_for_a_slot_when_every_slot_is_in_use(adapters):
    """One slot for two adapters; with in-flight batching the adapters ride in mixed steps too."""
    path, _, made = adapters["qwen2"]
    from maxlike.interfaces import SamplingParams

    llm = _llm(path, made, max_num_loras=1, enable_in_flight_batching=True, max_batch_size=2)
    prompts = [random_prompt(4 + 7 * i, seed=i).tolist() for i in range(6)]
    names = ["a", None, None, "a", "b", None]  # b waits for a's slot, then evicts a
    params = [SamplingParams(top_k=1, ignore_eos=True, max_new_tokens=n) for n in (3, 8, 4, 6, 5, 4)]
    together = llm.generate_outputs(prompts, sampling_params=params, lora=names, use_tqdm=False)
    assert llm.scheduler.stats.mixed_steps > 0, "prompts were prefilled beside running rows"
    for prompt, name, p, out in zip(prompts, names, params, together):
        assert out.token_ids == llm.generate_outputs([prompt], sampling_params=p, lora=name,
                                                     use_tqdm=False)[0].token_ids


def test_the_prefix_cache_never_shares_pages_across_adapters(adapters):
    path, _, made = adapters["llama"]
    llm = _llm(path, made, enable_prefix_caching=True, kv_cache_page_size=4)
    prompt = random_prompt(21, seed=9).tolist()
    out_a = llm.generate_outputs([prompt], max_new_tokens=4, lora="a", use_tqdm=False)[0].token_ids
    stats = llm.pipeline.model.kv_manager.prefix_cache.stats
    assert stats.hit_tokens == 0
    out_b = llm.generate_outputs([prompt], max_new_tokens=4, lora="b", use_tqdm=False)[0].token_ids
    assert stats.hit_tokens == 0, "pages computed under adapter a served adapter b"
    again = llm.generate_outputs([prompt], max_new_tokens=4, lora="a", use_tqdm=False)[0].token_ids
    assert stats.hit_tokens > 0 and again == out_a and out_a != out_b


def test_unknown_adapters_and_lora_off_fail_the_request_alone(adapters):
    from maxlike.interfaces import RequestError

    path, _, made = adapters["llama"]
    llm = _llm(path, made)
    with pytest.raises(RequestError, match="unknown LoRA adapter 'zzz'; loaded: \\['a', 'b'\\]"):
        llm.generate(["hi"], max_new_tokens=2, lora="zzz", use_tqdm=False)
    assert llm.generate(["hi"], max_new_tokens=2, lora="a", use_tqdm=False)
    with pytest.raises(RequestError, match="got 2 LoRA adapter names for 1 prompts"):
        llm.generate(["hi"], max_new_tokens=2, lora=["a", "b"], use_tqdm=False)
    from maxlike.entrypoints import LLM
    from maxlike.pipelines import PipelineConfig

    plain = LLM(PipelineConfig(model_path=path, max_length=64, max_batch_size=2), progress=False)
    assert plain.pipeline.model.lora_manager is None
    with pytest.raises(RequestError, match="LoRA is off"):
        plain.generate(["hi"], max_new_tokens=2, lora="a", use_tqdm=False)


def _edit_config(folder, **changes):
    with open(os.path.join(folder, "adapter_config.json")) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)


def test_bad_adapters_fail_before_anything_is_placed(adapters, tiny_models, tmp_path):
    from maxlike.config import ConfigError

    path, hf, made = adapters["llama"]
    good = made["b"][0]

    def copy_of(name):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        return folder

    def fails(folder, match, **kw):
        with pytest.raises(ConfigError, match=match):
            build_model(path, enable_lora=True, lora_paths=(f"x={folder}",), max_length=32, **kw)

    fails(good, "r is 8, above max_lora_rank=4: raise max_lora_rank", max_lora_rank=4)
    folder = copy_of("no-weights")
    os.remove(folder / "adapter_model.safetensors")
    fails(folder, "adapter_model.safetensors is missing")
    folder = copy_of("not-peft")
    os.remove(folder / "adapter_config.json")
    fails(folder, "no adapter_config.json, so this is not a PEFT adapter folder")
    folder = copy_of("lm-head")
    _edit_config(folder, target_modules=["q_proj", "lm_head"])
    fails(folder, r"target_modules lists \['lm_head'\], which maxlike does not adapt")
    folder = copy_of("dora")
    _edit_config(folder, use_dora=True)
    fails(folder, "use_dora is set: DoRA adapters are not supported")
    # An adapter trained on another model: qwen2's tiny model has the same shapes, so use a wider one.
    import transformers as tf

    other = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    folder = tmp_path / "other-model"
    make_adapter(other, folder, seed=3, r=4, lora_alpha=8, target_modules=["q_proj"])
    fails(folder, r"has shape \[4, 32\], but the base model's q_proj with r=4 needs \[4, 64\]")


TP_SCRIPT = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, sys.argv[1])
from conftest import random_prompt
from maxlike.entrypoints import LLM
from maxlike.pipelines import PipelineConfig

path, specs = sys.argv[2], json.loads(sys.argv[3])
prompts = [random_prompt(n, seed=n).tolist() for n in (5, 11, 8)]
out = {}
for tp in (1, 2):
    llm = LLM(PipelineConfig(model_path=path, max_length=64, max_batch_size=4, dtype="float32", enable_lora=True,
                             lora_paths=tuple(specs), max_lora_rank=8, max_num_loras=2, devices=str(tp),
                             tensor_parallel_degree=tp), progress=False)
    outs = llm.generate_outputs(prompts, max_new_tokens=8, lora=[None, "a", "b"], use_tqdm=False)
    out[tp] = [o.token_ids for o in outs]
print(json.dumps(out))
"""


@pytest.mark.slow  # `make test-slow` (the fast suite must stay under 15 minutes)
def test_tensor_parallel_2_equals_one_device(adapters, eight_head_models, tmp_path):
    import subprocess
    import sys

    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(eight_head_models["llama"], dtype=torch.float32)
    specs = []
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        make_adapter(hf, tmp_path / name, seed=20 + i, **kw)
        specs.append(f"{name}={tmp_path / name}")
    r = subprocess.run([sys.executable, "-c", TP_SCRIPT, os.path.dirname(__file__), eight_head_models["llama"],
                        json.dumps(specs)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["1"] == out["2"]
    assert out["1"][0] != out["1"][1] != out["1"][2]


def test_the_server_serves_adapters_by_model_name(adapters):
    import openai

    from conftest import free_port
    from maxlike.serve.app import ServerSettings, build_app
    from maxlike.serve.engine import Engine
    from maxlike.serve.metrics import Metrics
    from maxlike.serve.server import run_in_thread

    path, _, made = adapters["llama"]
    llm = _llm(path, made)
    metrics = Metrics()
    engine = Engine(lambda: llm, metrics=metrics).start()
    assert engine.ready.wait(120) and engine.load_error is None
    port = free_port()
    server = run_in_thread(build_app(engine, ServerSettings(served_names=("tiny",)), metrics), "127.0.0.1", port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        listed = {m.id: m for m in client.models.list().data}
        assert sorted(listed) == ["a", "b", "tiny"] and listed["a"].parent == "tiny"
        prompt = random_prompt(7, seed=2).tolist()
        for model, lora in (("tiny", None), ("a", "a"), ("b", "b")):
            got = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0)
            want = llm.scheduler.pipeline.tokenizer.decode(
                _hf_greedy(made[lora][1] if lora else adapters["llama"][1], np.asarray(prompt), 6),
                skip_special_tokens=True)
            assert got.choices[0].text == want, model
        with pytest.raises(openai.NotFoundError, match="This server serves: tiny, a, b"):
            client.completions.create(model="nope", prompt="hi", max_tokens=2)
    finally:
        server.should_exit = True
        engine.shutdown(10)


@pytest.mark.slow  # about 17 s: `make test-slow`
def test_warm_cache_with_lora_and_in_flight_batching_then_any_adapter_compiles_nothing(adapters, tmp_path):
    import subprocess
    import sys

    from conftest import dry_run_counts, kinds_written

    path, _, made = adapters["llama"]

    def maxlike(*args):
        return subprocess.run([sys.executable, "-m", "maxlike.entrypoints.cli", *args], capture_output=True, text=True,
                              timeout=600, cwd=os.path.join(os.path.dirname(__file__), ".."))

    common = ["--model-path", path, "--max-batch-size", "2", "--max-length", "32", "--enable-lora",
              "--max-lora-rank", "8", "--max-num-loras", "2", "--enable-in-flight-batching", "--cache-dir", str(tmp_path)]
    warm = maxlike("warm-cache", "--jobs", "2", "--quiet", "--no-convert-weights", *common)  # no adapter named
    assert warm.returncode == 0, warm.stderr[-2000:]
    # decode: batches 1, 2; prefill: 16 tokens x 1, 2 rows, 32 x 1; mixed (in-flight batching): 2 rows (one
    # one-token row and a chunk) x chunks of 16 and 32, sharing the samplers of batch 2; one LoRA slot update.
    assert dry_run_counts(warm.stdout) == {"step": 7, "unpack_inputs": 7, "decode_loop": 2, "logprobs": 4,
                                           "sample": 2, "sample_greedy": 2, "lora_slot": 1}
    assert kinds_written(tmp_path) == dry_run_counts(warm.stdout)
    for name in ("b",):
        run = maxlike("generate", "--prompt", "hello", "--max-new-tokens", "4", "--verbose", "--quiet", "--lora", name,
                      "--lora-paths", *(f"{n}={f}" for n, (f, _) in made.items()), *common)
        assert run.returncode == 0, run.stderr[-2000:]
        assert "compiled 0 executables" in run.stderr, run.stderr[-2000:]
    bad = maxlike("generate", "--prompt", "hello", "--max-new-tokens", "4", "--lora", "zzz", *common)
    assert bad.returncode != 0 and "unknown LoRA adapter 'zzz'" in bad.stderr


def test_lora_runs_the_projections_unfused(tiny_llama):
    """Adapters update q, k, v, gate and up apart: with LoRA the CPU's fused default is off, and
    asking for fusion is refused by name."""
    from maxlike.config import ConfigError

    assert not build_model(tiny_llama[0], enable_lora=True).fused
    with pytest.raises(ConfigError, match="fuse_projections=True cannot be combined with enable_lora"):
        build_model(tiny_llama[0], enable_lora=True, fuse_projections=True)
