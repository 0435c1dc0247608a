"""Compile-only mode and the ahead-of-time executable cache."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import warnings

import pytest

from conftest import dry_run_counts, kinds_written
from maxlike.entrypoints import LLM
from maxlike.interfaces import SamplingParams
from maxlike.pipelines import PipelineConfig

GREEDY8 = SamplingParams(top_k=1, max_new_tokens=8, ignore_eos=True)


def _maxlike(*args):
    return subprocess.run([sys.executable, "-m", "maxlike.entrypoints.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=os.path.join(os.path.dirname(__file__), ".."))


def test_warm_cache_then_generate_compiles_nothing(tiny_llama, tmp_path):
    common = ["--model-path", tiny_llama[0], "--max-batch-size", "2", "--max-length", "32"]
    r = _maxlike("warm-cache", "--cache-dir", str(tmp_path), "--jobs", "2", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "compiling (2 jobs): 100%" in r.stderr and "5/5" in r.stderr  # one bar over both workers' buckets
    # The closed form (printed first, as --dry-run does), written out: batches 1, 2 decode buckets (one
    # page-table width: attention picks the pages it reads on device); prefill (16 tokens x 1, 2 rows),
    # (32 x 1); 2 log-prob sizes and 2 samplers per batch bucket.
    assert dry_run_counts(r.stdout) == {"step": 5, "unpack_inputs": 5, "decode_loop": 2, "logprobs": 4,
                                        "sample": 2, "sample_greedy": 2}
    assert "compiled in" in r.stdout and "MiB written to" in r.stdout and "2 jobs" in r.stdout
    assert "the slowest and largest of 20 compiles" in r.stdout
    records = glob.glob(str(tmp_path / "executables" / "*.json"))
    assert not glob.glob(str(tmp_path / "executables" / "startup" / "*")), "compile-only order is no start's order"
    assert kinds_written(tmp_path) == dry_run_counts(r.stdout)
    assert len(records) == int(r.stdout.split("warm-cache: ")[2].split()[0]) == 20
    one = _maxlike("warm-cache", "--cache-dir", str(tmp_path / "one"), "--quiet", "--jobs", "1",
                   "--no-convert-weights", *common)
    assert one.returncode == 0 and "1 job)" in one.stdout, one.stderr[-2000:]
    assert "weights not converted" in one.stdout
    assert sorted(os.listdir(tmp_path / "one" / "executables")) == sorted(os.listdir(tmp_path / "executables"))
    ask = ["generate", "--prompt", "hello there", "--max-new-tokens", "8", "--verbose", "--quiet", *common]
    warm = _maxlike(*ask, "--cache-dir", str(tmp_path))
    cold = _maxlike(*ask, "--no-executable-cache", "--no-weights-cache")
    assert warm.returncode == 0 and cold.returncode == 0, warm.stderr[-2000:] + cold.stderr[-2000:]
    assert "compiled 0 executables" in warm.stderr and "loaded 0 " not in warm.stderr
    assert "compiled 0 executables" not in cold.stderr
    assert warm.stdout == cold.stdout
    # warm-cache converted the weights too (on the host): the first start reads no checkpoint file.
    assert "converted weights in" in r.stdout and len(glob.glob(str(tmp_path / "weights" / "*"))) == 1
    assert "weights from the converted-weights cache" in warm.stderr
    assert "weights from the checkpoint files" in cold.stderr


def test_the_count_formula_holds_with_echo_and_multi_step_decode(tiny_llama, tmp_path):
    common = ["--model-path", tiny_llama[0], "--max-batch-size", "1", "--max-length", "16", "--enable-echo",
              "--max-num-steps", "4", "--no-convert-weights", "--quiet", "--cache-dir", str(tmp_path)]
    dry = _maxlike("warm-cache", "--dry-run", *common)
    assert dry.returncode == 0 and not os.path.exists(tmp_path / "executables"), dry.stderr[-2000:]
    assert dry_run_counts(dry.stdout) == {"step": 2, "unpack_inputs": 2, "decode_loop": 1, "prepare_next": 1,
                                          "logprobs": 2, "echo_logprobs": 2, "sample": 1, "sample_greedy": 1}
    r = _maxlike("warm-cache", "--jobs", "1", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert kinds_written(tmp_path) == dry_run_counts(dry.stdout)


def _stats(path, cache, **kw):
    kw = {"max_length": 64, "max_batch_size": 2, **kw}
    llm = LLM(PipelineConfig(model_path=path, cache_dir=str(cache), **kw), progress=False)
    out = llm.generate_outputs(["abc"], sampling_params=GREEDY8, use_tqdm=False)[0].token_ids
    return llm.pipeline.model.session.stats, out


@pytest.mark.slow  # about 20 s: `make test-slow`
def test_every_key_part_misses_and_a_bad_entry_is_recompiled(tiny_llama, tmp_path, monkeypatch):
    from maxlike.engine import exe_cache

    first, tokens = _stats(tiny_llama[0], tmp_path)
    assert first.compiled > 0 and first.loaded == 0 and first.cached_bytes > 0
    again, same = _stats(tiny_llama[0], tmp_path)
    assert (again.compiled, again.loaded) == (0, first.compiled) and same == tokens
    for change in ({"dtype": "bfloat16"}, {"max_batch_size": 4}, {"max_length": 32}):
        stats, _ = _stats(tiny_llama[0], tmp_path, **change)
        assert stats.compiled > 0, f"{change} must miss the cache"
    monkeypatch.setattr(exe_cache, "versions", lambda: {"jax": "0.0.fake", "jaxlib": "0.0.fake"})
    stats, _ = _stats(tiny_llama[0], tmp_path)
    assert stats.compiled == first.compiled, "another jax version misses every entry"
    monkeypatch.undo()

    entries = sorted(glob.glob(str(tmp_path / "executables" / "*.exe")), key=os.path.getmtime)
    victim = entries[0]
    with open(victim, "rb") as f:
        blob = f.read()
    with open(victim, "wb") as f:
        f.write(blob[: len(blob) // 2])  # truncated, as by a crash mid-write elsewhere
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats, out = _stats(tiny_llama[0], tmp_path)
    assert any("truncated" in str(w.message) and "recompiling" in str(w.message) for w in caught)
    assert stats.compiled == 1 and out == tokens
    assert os.path.getsize(victim) > len(blob) // 2, "the recompiled entry replaced the truncated one"
    assert not glob.glob(str(tmp_path / "executables" / ".tmp-*")), "no temporary files left behind"


def test_a_warm_start_prefetches_what_the_last_start_used_first(tiny_llama, tmp_path):
    first, tokens = _stats(tiny_llama[0], tmp_path)
    assert first.prefetched == 0 and len(glob.glob(str(tmp_path / "executables" / "startup" / "*.json"))) == 1
    again, same = _stats(tiny_llama[0], tmp_path)
    assert (again.compiled, again.loaded, again.prefetched) == (0, first.compiled, min(first.compiled, 16))
    assert same == tokens


def test_an_executable_jax_already_ran_is_still_cached(tmp_path):
    """jax reuses what it compiled for a function earlier in the process; after a run, XLA:CPU's
    sort no longer serializes ("`LessThan` is not serializable"): the session compiles afresh."""
    import numpy as np

    from maxlike.engine import InferenceSession
    from maxlike.pipelines import sampling

    args = (np.random.default_rng(0).normal(size=(3, 320)).astype(np.float32),
            sampling.SamplingInputs.build([], [], 3, vocab=320, stop_slots=1), np.zeros(3, np.int32))
    first = InferenceSession(cache_dir=str(tmp_path / "a"))
    first.compile("sample", sampling.sample, args)(*args)
    second = InferenceSession(cache_dir=str(tmp_path / "b"))  # another cache: a miss
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exe = second.compile("sample", sampling.sample, args)
    assert second.stats.compiled == 1 and second.stats.cached_bytes > 0
    np.testing.assert_array_equal(exe(*args)[0], first.executables("sample")[0](*args)[0])


def test_compile_only_allocates_nothing_and_refuses_to_run(tiny_llama, tmp_path):
    import jax

    from maxlike.pipelines import PIPELINE_REGISTRY

    config = PipelineConfig(model_path=tiny_llama[0], max_length=32, max_batch_size=2, compile_only=True,
                            cache_dir=str(tmp_path))
    _, pipeline = PIPELINE_REGISTRY.retrieve(config, progress=False)
    model = pipeline.model
    assert all(isinstance(w, jax.ShapeDtypeStruct) for w in model.params.values())
    assert all(isinstance(k, jax.ShapeDtypeStruct) for k, _ in model.kv_manager.pool)
    assert model.signal_buffers == []
    hf, cls = model.huggingface_config, type(model)
    from_shapes = cls.estimate_activation_memory(config, hf)
    pipeline.compile_all(progress=False)
    assert model.session.stats.compiled > len(model.step_buckets())

    # From now on the activation estimate is XLA's own: the largest temporaries of any executable.
    from maxlike.engine.session import memory_analysis

    measured = max(memory_analysis(e)["temp_size_in_bytes"] for e in model.session.executables())
    assert measured > 0 and measured != from_shapes
    assert cls.estimate_activation_memory(config, hf) == measured
    assert cls.estimate_activation_memory(config.replace(compile_only=False), hf) == measured  # the run it sizes
    assert cls.estimate_activation_memory(config.replace(max_batch_size=1), hf) != measured  # other programs
    with pytest.raises(RuntimeError, match="built compile-only"):
        model.execute(model.zero_inputs(1, 1, 1))


def test_converted_weights_are_restored_without_reading_the_source(tiny_llama, tmp_path, monkeypatch):
    import shutil

    import maxlike.pipelines.decoder as decoder
    from maxlike.weights.converted import WeightsCacheWarning

    _, tokens = _stats(tiny_llama[0], tmp_path)
    checkpoints = glob.glob(str(tmp_path / "weights" / "*"))
    assert len(checkpoints) == 1

    def no_reading(*args, **kwargs):
        raise AssertionError("the source files were read although their conversion is cached")

    with monkeypatch.context() as m:
        m.setattr(decoder, "read_weights", no_reading)
        _, restored = _stats(tiny_llama[0], tmp_path)
    assert restored == tokens
    _stats(tiny_llama[0], tmp_path, dtype="bfloat16")  # another conversion: its own checkpoint
    assert len(glob.glob(str(tmp_path / "weights" / "*"))) == 2

    for item in os.listdir(checkpoints[0]):  # damage the checkpoint: warned, then read from the source
        target = os.path.join(checkpoints[0], item)
        shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, again = _stats(tiny_llama[0], tmp_path)
    assert [str(w.message) for w in caught if w.category is WeightsCacheWarning][0].count("could not be restored")
    assert not [w for w in caught if "could not save" in str(w.message)], "the damaged checkpoint was replaced"
    assert again == tokens
    with monkeypatch.context() as m:
        m.setattr(decoder, "read_weights", no_reading)
        assert _stats(tiny_llama[0], tmp_path)[1] == tokens


def test_an_unwritable_cache_folder_runs_uncached_with_one_warning(tiny_llama, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats, tokens = _stats(tiny_llama[0], blocker / "cache")  # cannot be created: a file is in the way
    messages = [str(w.message) for w in caught if "cannot be written" in str(w.message)]
    assert len(messages) == 1 and "running without it" in messages[0], [str(w.message) for w in caught]
    assert stats.compiled > 0 and stats.cached_bytes == 0
    assert tokens == _stats(tiny_llama[0], tmp_path / "fine")[1]


def test_entries_not_written_by_this_cache_are_refused_before_unpickling(tiny_llama, tmp_path, monkeypatch):
    import pickle

    first, tokens = _stats(tiny_llama[0], tmp_path)
    secret = tmp_path / "executables" / ".secret"
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    # Another cache's secret (a folder copied from elsewhere, or a forged entry): nothing is unpickled.
    secret.write_bytes(os.urandom(32))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: (_ for _ in ()).throw(AssertionError("unpickled")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats, again = _stats(tiny_llama[0], tmp_path)
    refused = [str(w.message) for w in caught if "not written by this cache" in str(w.message)]
    assert len(refused) == first.compiled and stats.loaded == 0 and again == tokens
    monkeypatch.undo()
    assert _stats(tiny_llama[0], tmp_path)[0].loaded == first.compiled, "entries rewritten under the new secret load"
    # A secret others can read or write is not trusted: everything compiles.
    secret.chmod(0o644)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats, _ = _stats(tiny_llama[0], tmp_path)
    assert stats.loaded == 0 and any("not private to this user" in str(w.message) for w in caught)


def _secret_in(folder, barrier, out):
    from maxlike.engine.exe_cache import ExecutableCache

    barrier.wait()  # every process asks for the folder's secret at the same moment
    out.put(ExecutableCache(folder).secret(create=True))


@pytest.mark.filterwarnings("ignore:os.fork")  # the forked children only read and write files, never JAX
def test_processes_starting_together_share_one_whole_secret(tmp_path):
    """warm-cache --jobs starts its workers at once: each must read the secret one of them made,
    whole (a worker that read it half-written ran without writing anything)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for attempt in range(5):
        folder, n = str(tmp_path / f"cache{attempt}"), 8
        barrier, out = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_secret_in, args=(folder, barrier, out)) for _ in range(n)]
        for p in procs:
            p.start()
        keys = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(60)
        assert all(k is not None and len(k) == 32 for k in keys) and len(set(keys)) == 1
        assert sorted(os.listdir(folder)) == [".secret"]  # no temporary file left behind


def _key_of(path, cache, **kw):
    stats, _ = _stats(path, cache, **kw)
    return stats


@pytest.mark.parametrize("change", ["xla_flags"] + [pytest.param(c, marks=pytest.mark.slow)  # the rest: test-slow
                                                    for c in ("jax_option", "plugin", "outside_architecture_code")])
def test_what_changes_programs_changes_the_key(tiny_llama, tmp_path, monkeypatch, request, change):
    from maxlike.engine import exe_cache

    first, _ = _stats(tiny_llama[0], tmp_path)
    assert _stats(tiny_llama[0], tmp_path)[0].compiled == 0
    if change == "xla_flags":
        monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_math=false")
    elif change == "jax_option":
        import jax

        before = jax.config.jax_default_matmul_precision
        jax.config.update("jax_default_matmul_precision", "highest")
        request.addfinalizer(lambda: jax.config.update("jax_default_matmul_precision", before))
    elif change == "plugin":
        monkeypatch.setattr(exe_cache, "_plugin_versions", lambda: (("jax-cuda12-plugin", "0.0.fake"),))
    if change != "outside_architecture_code":
        assert _stats(tiny_llama[0], tmp_path)[0].compiled == first.compiled, f"{change} must miss"
        return
    # An architecture registered from outside maxlike: its source file is part of the key.
    import importlib.util

    module = tmp_path / "outside_arch.py"
    source = ("import graphs.llama as L\n"
              "def forward(*a, **k):\n    return L.forward(*a, **k)\n"
              "ARCH = L._arch('LlamaForCausalLM', ('llama',), '').__class__(**{**L._arch('LlamaForCausalLM', "
              "('llama',), '').__dict__, 'forward': forward})\n")

    def outside_stats():
        spec = importlib.util.spec_from_file_location("outside_arch", module)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        from maxlike.engine import InferenceSession
        from maxlike.pipelines.decoder import DecoderPipelineModel

        config = PipelineConfig(model_path=tiny_llama[0], max_length=64, max_batch_size=2, cache_dir=str(tmp_path))
        session = InferenceSession(cache_dir=str(tmp_path / "executables"))
        model = DecoderPipelineModel(config, session, session.devices, config.kv_cache, None, mod.ARCH,
                                     "last_token", progress=False)
        model.compile_bucket(1, 1, 1, 1)
        return session.stats

    module.write_text(source)
    assert outside_stats().compiled > 0
    assert outside_stats().compiled == 0, "the same outside code loads"
    module.write_text(source + "# changed\n")
    assert outside_stats().compiled > 0, "changed outside code misses"
