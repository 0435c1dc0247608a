"""Time from process start to the first generated token (SmolLM2, CPU): cold vs warm caches.

    .venv/bin/python benchmarks/bench_startup.py [--repeats 2]

Each run is a fresh `maxlike generate` process with its own cache folder state:
  cold       nothing cached (GGUF metadata parsed, weights dequantized, every executable compiled);
  warm-meta  config, tokenizer and converted weights (orbax) cached; executables compiled;
  warm-exe   config, tokenizer and executables cached; weights read from the GGUF (no orbax cache);
  warm       all of it cached.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ARGS = ["generate", "--prompt", "What is the capital of France?", "--chat", "--max-new-tokens", "8", "--quiet",
        "--max-batch-size", "1", "--max-length", "512"]


def first_token_seconds(cache: str) -> tuple[float, str]:
    env = dict(os.environ, MAXLIKE_CACHE_DIR=cache, PYTHONUNBUFFERED="1")
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "maxlike.entrypoints.cli", *ARGS], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, env=env)
    first = p.stdout.read(1)
    dt = time.perf_counter() - t
    rest = p.stdout.read()
    p.wait()
    return dt, (first + rest).decode(errors="replace").strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    results: dict[str, list[float]] = {"cold": [], "warm-meta": [], "warm-exe": [], "warm": []}
    for _ in range(args.repeats):
        cache = tempfile.mkdtemp(prefix="maxlike-startup-")
        try:
            results["cold"].append(first_token_seconds(cache)[0])
            shutil.rmtree(os.path.join(cache, "executables"))
            results["warm-meta"].append(first_token_seconds(cache)[0])
            shutil.rmtree(os.path.join(cache, "weights"))
            results["warm-exe"].append(first_token_seconds(cache)[0])  # (saves the weights again)
            dt, text = first_token_seconds(cache)
            results["warm"].append(dt)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    best = {k: min(v) for k, v in results.items()}
    for k, v in best.items():
        print(f"{k:10s} first token after {v:5.2f} s (best of {args.repeats}; {v / best['cold']:.0%} of cold)")
    print(f"output: {text!r}")


if __name__ == "__main__":
    main()
