"""The `maxlike` command line."""

from __future__ import annotations

import subprocess
import sys


def maxlike(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maxlike.entrypoints.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_generate_streams_the_same_text_as_llm(tiny_llm, tiny_llama):
    r = maxlike("generate", "--model-path", tiny_llama[0], "--prompt", "hello", "--max-new-tokens", "6",
                "--max-length", "128", "--max-batch-size", "4", "--quiet", "--verbose")
    assert r.returncode == 0, r.stderr
    assert r.stdout == tiny_llm.generate(["hello"], max_new_tokens=6, use_tqdm=False)[0] + "\n"
    assert "compiled" in r.stderr


def test_list_and_errors(tmp_path):
    r = maxlike("list")
    assert r.returncode == 0 and "LlamaForCausalLM" in r.stdout and "Qwen2ForCausalLM" in r.stdout
    r = maxlike("generate", "--model-path", str(tmp_path / "missing"), "--prompt", "x")
    assert r.returncode == 1 and "does not exist: pass a Hugging Face model directory" in r.stderr
    r = maxlike("generate", "--model-path", str(tmp_path), "--prompt", "x", "--max-lenght", "5")
    assert r.returncode == 2 and "--max-length" in r.stderr  # argparse suggests the right flag
    r = maxlike("serve")
    assert r.returncode == 2 and "not built yet" in r.stderr
    r = maxlike("warm-cache", "--target", "tpu:v5e:2x2")  # this environment has no libtpu
    assert r.returncode == 1 and "needs libtpu, which is not installed: pip install 'maxlike[tpu]'" in r.stderr
    r = maxlike("warm-cache", "--target", "tpu")
    assert r.returncode == 1 and "--target tpu: this machine's backend is cpu" in r.stderr
    r = maxlike("generate", "--prompt", "x", "--devices", "4", "--tensor-parallel-degree", "4")
    assert r.returncode == 1 and "asks for 4 devices but 1 cpu device(s) are present" in r.stderr


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
    assert r.returncode == 0 and "mesh: {'data': 1, 'tensor': 4} over 4 devices" in r.stdout, r.stderr[-2000:]


def test_benchmark_command(tiny_llama):
    r = maxlike("benchmark", "--model-path", tiny_llama[0], "--batch-sizes", "1", "2", "--max-new-tokens", "4",
                "--prompt-tokens", "8", "--max-length", "64")
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if x.startswith("maxlike batch")]
    assert len(lines) == 2 and "decode" in lines[0] and "prefill" in lines[0]
