"""The `maxlike` command line."""

from __future__ import annotations

import subprocess
import sys

import pytest


def maxlike(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maxlike.entrypoints.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_generate_streams_the_same_text_as_llm(tiny_llm, tiny_llama):
    r = maxlike("generate", "--model-path", tiny_llama[0], "--prompt", "hello", "--max-new-tokens", "6",
                "--max-length", "128", "--max-batch-size", "4", "--quiet", "--verbose")
    assert r.returncode == 0, r.stderr
    assert r.stdout == tiny_llm.generate(["hello"], max_new_tokens=6, use_tqdm=False)[0] + "\n"
    assert "compiled" in r.stderr


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`maxlike ARGS` in this process (for commands that fail or finish before loading a model):
    (exit status, stdout, stderr)."""
    from maxlike.entrypoints.cli import main

    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse: --help, usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_list_and_errors(tmp_path, capsys):
    rc, out, _ = cli(capsys, "list")
    assert rc == 0 and "LlamaForCausalLM" in out and "Qwen3ForCausalLM" in out
    assert "Gemma2ForCausalLM" in out and "attention and final logit soft-caps" in out  # what each one runs
    rc, _, err = cli(capsys, "generate", "--model-path", str(tmp_path / "missing"), "--prompt", "x")
    assert rc == 1 and "does not exist: pass a Hugging Face model directory" in err
    rc, _, err = cli(capsys, "generate", "--model-path", str(tmp_path), "--prompt", "x", "--max-lenght", "5")
    assert rc == 2 and "--max-length" in err  # argparse suggests the right flag
    rc, _, err = cli(capsys, "serve", "--max-queued-requests", "0")
    assert rc == 1 and "--max-queued-requests must be >= 1, got 0" in err
    rc, _, err = cli(capsys, "serve", "--model-path", str(tmp_path / "missing"))  # fails before it listens
    assert rc == 1 and "does not exist: pass a Hugging Face model directory" in err
    assert "later issue" not in cli(capsys, "--help")[1] + cli(capsys, "serve", "--help")[1]
    rc, _, err = cli(capsys, "warm-cache", "--target", "tpu")
    assert rc == 1 and "--target tpu: this machine's backend is cpu" in err
    rc, _, err = cli(capsys, "generate", "--prompt", "x", "--devices", "4", "--tensor-parallel-degree", "4")
    assert rc == 1 and "asks for 4 devices but 1 cpu device(s) are present" in err
    r = maxlike("warm-cache", "--target", "tpu:v5e:2x2")  # own process: whether libtpu is importable
    assert r.returncode == 1 and "needs libtpu, which is not installed: pip install 'maxlike[tpu]'" in r.stderr


@pytest.mark.slow  # about 30 s: `make test-slow`
def test_examples_run(tiny_llama):
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "examples")
    for name in ("pipeline_model.py", "generate.py"):
        r = subprocess.run([sys.executable, os.path.join(root, name), "--model-path", tiny_llama[0]],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    assert "compiles:" in subprocess.run(
        [sys.executable, os.path.join(root, "pipeline_model.py"), "--model-path", tiny_llama[0]],
        capture_output=True, text=True, timeout=300).stdout
    r = subprocess.run([sys.executable, os.path.join(root, "multi_device.py"), "--model-path", tiny_llama[0],
                        "--fake-cpu-devices", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mesh: {'data': 1, 'expert': 1, 'tensor': 4} over 4 devices" in r.stdout


@pytest.mark.slow  # about 12 s: `make test-slow`
def test_benchmark_command(tiny_llama):
    r = maxlike("benchmark", "--model-path", tiny_llama[0], "--batch-sizes", "1", "2", "--max-new-tokens", "4",
                "--prompt-tokens", "8", "--max-length", "64")
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if x.startswith("maxlike batch")]
    assert len(lines) == 2 and "decode" in lines[0] and "prefill" in lines[0]


def test_flags_take_their_types_from_the_config_fields(tiny_llama):
    """Each PipelineConfig field's flag parses to the field's declared type."""
    from maxlike.entrypoints.cli import build_parser, config_from_args, flag_options

    args = build_parser().parse_args([
        "generate", "--prompt", "x", "--model-path", tiny_llama[0], "--max-length", "64",
        "--device-memory-utilization", "0.5", "--weight-path", "model.safetensors", "other.safetensors",
        "--no-weights-cache", "--enable-prefix-caching", "--devices", "1", "--cache-dtype", "float32",
        "--host-kv-cache-memory-gib", "1"])
    config = config_from_args(args)
    assert config.model.max_length == 64 and type(config.model.max_length) is int
    assert config.kv_cache.device_memory_utilization == 0.5
    assert config.kv_cache.host_kv_cache_memory_gib == 1.0 and type(config.kv_cache.host_kv_cache_memory_gib) is float
    assert config.model.weight_path == ("model.safetensors", "other.safetensors")
    assert config.weights_cache is False and config.kv_cache.enable_prefix_caching is True
    assert config.devices == "1" and type(config.devices) is str, "an optional string stays a string"
    assert config.kv_cache.cache_dtype == "float32"
    r = maxlike("generate", "--prompt", "x", "--max-length", "sixty")
    assert r.returncode == 2 and "--max-length: invalid int value: 'sixty'" in r.stderr
    import pytest

    with pytest.raises(TypeError, match="no command-line form for a config field of type"):
        flag_options(dict[str, int])
