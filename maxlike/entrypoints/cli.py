"""The `maxlike` command: generate, list, benchmark, warm-cache, serve, bench-serve.

Every PipelineConfig field is a flag in kebab case (`--max-length`,
`--kv-cache-page-size`, ...), so one config reads the same as flags or kwargs.
Each flag's type comes from the field's declared type.
"""

from __future__ import annotations

import argparse
import textwrap
import json
import logging
import os
import subprocess
import sys
import time
import types
import typing
from typing import Any

from maxlike.config import ConfigError, PipelineConfig


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that remembers its option strings (to suggest one for a mistyped flag)."""

    def __init__(self, *args, **kwargs) -> None:
        self.flags: list[str] = []  # set first: the base class adds --help
        self.commands: dict[str, _Parser] = {}
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        self.flags += [a for a in args if a.startswith("-")]
        return super().add_argument(*args, **kwargs)

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        add = group.add_argument

        def add_and_remember(*names, **options):
            self.flags += [a for a in names if a.startswith("-")]
            return add(*names, **options)

        group.add_argument = add_and_remember
        return group

    def suggest(self, unknown: list[str]) -> str:
        import difflib

        hints = []
        for flag in (u.split("=")[0] for u in unknown if u.startswith("-")):
            close = difflib.get_close_matches(flag, self.flags, n=1)
            hints.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
        return ", ".join(hints) or " ".join(unknown)


def flag_options(annotation: Any) -> dict[str, Any]:
    """argparse options for a config field of this (resolved) type: `bool` -> --x/--no-x,
    `tuple[T, ...]` -> one or more T, `int | None` -> an int (None is the flag's absence)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(annotation) is tuple:
        return {"nargs": "+", "type": typing.get_args(annotation)[0]}
    if annotation in (int, float, str):
        return {"type": annotation}
    raise TypeError(f"no command-line form for a config field of type {annotation!r}")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pipeline config (PipelineConfig fields)")
    for name, annotation in PipelineConfig.flag_types().items():
        group.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **flag_options(annotation))


def config_from_args(args: argparse.Namespace, *, default_model: bool = False) -> PipelineConfig:
    values = {k: v for k, v in vars(args).items() if k in PipelineConfig.flag_fields() and v is not None}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}  # nargs gives lists
    if not values.get("model_path") and default_model:
        from maxlike.entrypoints.llm import default_model_path

        values["model_path"] = default_model_path()
    return PipelineConfig(**values)


def _sampling(args):
    """SamplingParams from `maxlike generate`'s flags: greedy unless temperature, top-k, top-p or
    min-p asks to sample; logit processors apply either way. Bad values: RequestError (exit 2)."""
    import json

    from maxlike.interfaces import GREEDY, RequestError, SamplingParams

    bias = None
    if args.logit_bias is not None:
        try:
            bias = json.loads(args.logit_bias)
        except json.JSONDecodeError as e:
            raise RequestError(f"--logit-bias must be a JSON object of token id -> bias, e.g. '{{\"13\": -100}}': "
                               f"{e}") from None
    fmt = None
    if args.response_format is not None:
        try:
            fmt = json.loads(args.response_format)
        except json.JSONDecodeError as e:
            raise RequestError(f"--response-format must be JSON, e.g. '{{\"type\": \"json_object\"}}': {e}") from None
    extra = dict(response_format=fmt, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                 frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                 min_new_tokens=args.min_new_tokens, stop=tuple(args.stop or ()), logit_bias=bias)
    extra = {k: v for k, v in extra.items() if v is not None}
    if args.temperature is None and args.top_k is None and args.top_p is None and args.min_p is None:
        return GREEDY.replace(seed=args.sampling_seed, **extra)
    return SamplingParams(temperature=1.0 if args.temperature is None else args.temperature,
                          top_k=-1 if args.top_k is None else args.top_k,
                          top_p=1.0 if args.top_p is None else args.top_p, seed=args.sampling_seed, **extra)


def cmd_generate(args) -> int:
    from maxlike.entrypoints.llm import LLM
    from maxlike.interfaces import TextGenerationRequest

    if args.max_batch_size is None:
        args.max_batch_size = 1  # one prompt: size the KV pool for one sequence
    config = config_from_args(args, default_model=True)
    t0 = time.perf_counter()
    llm = LLM(config, progress=not args.quiet)
    params = _sampling(args).replace(max_new_tokens=args.max_new_tokens)
    rid = llm.pipeline.next_request_id()
    prompt = dict(messages=[{"role": "user", "content": args.prompt}]) if args.chat else dict(prompt=args.prompt)
    req = TextGenerationRequest(rid, sampling_params=params, lora_name=args.lora, **prompt)
    t1 = time.perf_counter()
    import jax

    lead = jax.process_index() == 0  # a multi-host job prints once
    for piece in llm.stream(req):
        if lead:
            print(piece, end="", flush=True)
    if lead:
        print()
    if args.verbose:
        model = llm.pipeline.model
        stats = model.session.stats.as_dict()
        print(f"[maxlike] load {t1 - t0:.1f}s, generate {time.perf_counter() - t1:.1f}s, "
              f"compiled {stats['compiled']} executables in {stats['compile_seconds']:.1f}s, loaded {stats['loaded']} "
              f"from the executable cache in {stats['load_seconds']:.1f}s, weights from the "
              f"{getattr(model, 'weights_source', 'model')}", file=sys.stderr)
    return 0


def cmd_list(args) -> int:
    from maxlike.pipelines.registry import PIPELINE_REGISTRY

    for name, arch in sorted(PIPELINE_REGISTRY.architectures.items()):
        print(f"{name:32s} model_type={','.join(arch.graph.model_types)}")
        if arch.graph.features:
            print(textwrap.fill(arch.graph.features, 100, initial_indent=" " * 4, subsequent_indent=" " * 4))
    return 0


def cmd_benchmark(args) -> int:
    from maxlike.entrypoints.bench import run_decode_benchmark

    config = config_from_args(args, default_model=True)
    rows = run_decode_benchmark(config, batch_sizes=args.batch_sizes, new_tokens=args.max_new_tokens,
                                prompt_tokens=args.prompt_tokens, roofline=args.roofline)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def cmd_warm_cache(args) -> int:
    """Compile every executable of the bucket set into the cache, allocating nothing."""
    import jax

    from maxlike.engine.mesh import executable_cache_dir
    from maxlike.pipelines.registry import PIPELINE_REGISTRY

    config = config_from_args(args, default_model=True).replace(compile_only=True, warmup=False,
                                                                 executable_cache=True)
    target = args.target
    if target and target.startswith("tpu:"):  # a TPU slice this machine need not have (libtpu)
        config = config.replace(compile_target=target)
    elif target and target != jax.default_backend():
        raise ConfigError(f"--target {target}: this machine's backend is {jax.default_backend()}; XLA compiles for "
                          f"{target} only where it is present (TPU slices excepted: --target tpu:<topology>), "
                          "so run warm-cache there.")
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}.")
    t0 = time.perf_counter()
    _, pipeline = PIPELINE_REGISTRY.retrieve(config, progress=not args.quiet and args.shard is None)
    model, stats = pipeline.model, pipeline.model.session.stats
    if args.shard is not None:  # one worker of --jobs: its part of the set, a JSON line for the parent
        index, count = (int(x) for x in args.shard.split("/"))
        pipeline.compile_all(progress=False, shard=(index, count),
                             on_bucket=lambda: print(PROGRESS_LINE, file=sys.stderr, flush=True))
        print(json.dumps({"compiled": stats.compiled, "compile_seconds": stats.compile_seconds,
                          "cached_bytes": stats.cached_bytes, "peak_temp_bytes": model.session.peak_temp_bytes,
                          "records": stats.records}))
        return 0
    counts = model.executable_counts(pipeline.max_num_steps)
    buckets = len(model.step_buckets())
    print(f"warm-cache: {buckets} buckets, {sum(counts.values())} executables ("
          + ", ".join(f"{n} {name}" for name, n in counts.items() if n) + ")", flush=True)
    if args.dry_run:
        return 0
    jobs = min(args.jobs or os.cpu_count() or 1, buckets)
    if jobs > 1:
        results = _compile_in_workers(args, jobs, buckets)
        stats.compiled = sum(r["compiled"] for r in results)
        stats.compile_seconds = sum(r["compile_seconds"] for r in results)
        stats.cached_bytes = sum(r["cached_bytes"] for r in results)
        stats.records = [record for r in results for record in r["records"]]
        model.session.peak_temp_bytes = max(r["peak_temp_bytes"] for r in results)
        model.record_activation_memory()
    else:
        pipeline.compile_all(progress=not args.quiet)
    print(f"warm-cache: {stats.compiled + stats.loaded} executables for {buckets} buckets "
          f"({stats.compiled} compiled in {stats.compile_seconds:.1f}s, {stats.loaded} already cached, "
          f"{jobs} job{'s' if jobs > 1 else ''}), "
          f"{stats.cached_bytes / 2**20:.1f} MiB written to {executable_cache_dir(config)} "
          f"in {time.perf_counter() - t0:.1f}s")
    _print_slowest_and_largest(stats.records)
    convert = getattr(model, "convert_weights", None)
    if not args.convert_weights or not config.weights_cache or convert is None:
        print("warm-cache: weights not converted (--no-convert-weights or --no-weights-cache)")
        return 0
    t0 = time.perf_counter()
    folder = convert(progress=not args.quiet)  # on the host: nothing is placed on a device
    print(f"warm-cache: converted weights in {folder} ({time.perf_counter() - t0:.1f}s)" if folder else
          "warm-cache: the converted weights could not be cached (see the warning above)")
    return 0


PROGRESS_LINE = "maxlike-warm-cache: bucket done"  # a --jobs worker's progress, on its stderr


def _compile_in_workers(args, jobs: int, buckets: int) -> list[dict]:
    """Split the bucket set over `jobs` processes running this same command (each compile is
    independent and every cache write atomic), with one progress bar over all of them; their
    JSON result lines, or an error naming the worker that failed."""
    import threading

    from tqdm.auto import tqdm

    argv = [a for a in args.argv if a != "--quiet"]
    # Compiling for a TPU topology touches no TPU, so several processes may load libtpu (whose
    # lockfile otherwise admits one per machine).
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    procs = [subprocess.Popen([sys.executable, "-m", "maxlike.entrypoints.cli", *argv, "--quiet", "--jobs", "1",
                               "--shard", f"{i}/{jobs}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env)
             for i in range(jobs)]
    bar = tqdm(total=buckets, desc=f"compiling ({jobs} jobs)", unit="bucket", disable=args.quiet)
    errors: list[list[str]] = [[] for _ in procs]

    def follow(i: int) -> None:  # a worker's stderr: progress ticks, everything else kept
        for line in procs[i].stderr:
            if line.strip() == PROGRESS_LINE:
                bar.update(1)
            else:
                errors[i].append(line)

    readers = [threading.Thread(target=follow, args=(i,), daemon=True) for i in range(jobs)]
    for reader in readers:
        reader.start()
    results, failed = [], []
    for i, proc in enumerate(procs):
        out = proc.stdout.read()
        proc.wait()
        readers[i].join()
        err = "".join(errors[i])
        if proc.returncode != 0:
            failed.append(f"worker {i + 1}/{jobs} exited with {proc.returncode}: {err.strip()[-2000:]}")
        else:
            results.append(json.loads(out.strip().splitlines()[-1]))
            for line in err.splitlines():  # a worker's warnings (e.g. an unwritable cache) reach the user
                if "Warning: " in line:
                    print(f"warm-cache worker {i + 1}/{jobs}: {line.strip()}", file=sys.stderr)
    bar.close()
    if failed:
        raise RuntimeError("warm-cache --jobs: " + "; ".join(failed))
    return results


def _print_slowest_and_largest(records: list[dict], top: int = 5) -> None:
    if not records:
        return
    print(f"warm-cache: the slowest and largest of {len(records)} compiles")
    print(f"  {'executable':<22} {'bucket (rows x tokens x width)':>32} {'seconds':>9} {'MiB':>9}")
    seen = set()
    for r in sorted(records, key=lambda r: -r["seconds"])[:top] + sorted(records, key=lambda r: -r["bytes"])[:top]:
        if id(r) not in seen:
            seen.add(id(r))
            print(f"  {r['name']:<22} {r.get('bucket', '-'):>32} {r['seconds']:>9.2f} {r['bytes'] / 2**20:>9.2f}")


def cmd_serve(args) -> int:
    from maxlike.serve.app import ServerSettings
    from maxlike.serve.server import default_served_name, serve

    if args.max_queued_requests is not None and args.max_queued_requests < 1:
        raise ConfigError(f"--max-queued-requests must be >= 1, got {args.max_queued_requests}.")
    if args.warmup is None:
        args.warmup = True  # every bucket compiled (or loaded) before /health answers 200
    config = config_from_args(args, default_model=True)
    names = tuple(args.served_model_name or [default_served_name(config)])
    settings = ServerSettings(served_names=names, api_key=args.api_key or None,
                              max_queued_requests=args.max_queued_requests)
    return serve(config, settings, host=args.host, port=args.port, shutdown_grace_s=args.shutdown_grace,
                 progress=not args.quiet, log_level="warning" if args.quiet else "info")


def cmd_bench_serve(args) -> int:
    from maxlike.serve.benchmark import main_from_args

    return main_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="maxlike", description="LLM inference on JAX/XLA with MAX's pipeline API.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate text for one prompt (streams to stdout)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--min-p", type=float)
    gen.add_argument("--sampling-seed", type=int)
    gen.add_argument("--repetition-penalty", type=float, help="HF's: > 1 discourages tokens already seen")
    gen.add_argument("--frequency-penalty", type=float, help="OpenAI's, in [-2, 2]")
    gen.add_argument("--presence-penalty", type=float, help="OpenAI's, in [-2, 2]")
    gen.add_argument("--min-new-tokens", type=int, help="stop tokens are masked until this many are made")
    gen.add_argument("--logit-bias", help="a JSON object of token id -> bias in [-100, 100]")
    gen.add_argument("--stop", action="append", help="a stop string (repeatable): the text ends before it")
    gen.add_argument("--response-format", help='structured output as JSON: {"type": "json_object"}, '
                     '{"type": "json_schema", "json_schema": {"schema": ...}}, {"type": "regex", "regex": ...}, '
                     '{"type": "choice", "choices": [...]}, {"type": "grammar", "grammar": ...}')
    gen.add_argument("--lora", help="generate with this LoRA adapter (a name from --lora-paths; needs --enable-lora)")
    gen.add_argument("--verbose", action="store_true", help="print load/compile statistics to stderr")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flags(gen)
    gen.set_defaults(run=cmd_generate)

    lst = sub.add_parser("list", help="list supported architectures")
    lst.set_defaults(run=cmd_list)

    bench = sub.add_parser("benchmark", help="decode and prefill tokens/s of one model")
    bench.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    bench.add_argument("--max-new-tokens", type=int, default=64)
    bench.add_argument("--prompt-tokens", type=int, default=64)
    bench.add_argument("--roofline", action="store_true", help="also measure this device's memory bandwidth and "
                       "matmul peak, and print each batch's share of them (decode: bytes read per step; prefill: "
                       "FLOPs)")
    bench.add_argument("--json", help="write the results here")
    add_config_flags(bench)
    bench.set_defaults(run=cmd_benchmark)

    warm = sub.add_parser("warm-cache", help="compile every executable into the ahead-of-time cache")
    warm.add_argument("--target", help="cpu or gpu (this machine's backend, the default), or tpu:<topology> such "
                      "as tpu:v5e:2x2 to compile for a TPU slice this machine lacks (needs maxlike[tpu])")
    warm.add_argument("--quiet", action="store_true", help="no progress bars")
    warm.add_argument("--dry-run", action="store_true", help="print the bucket and executable counts, compile nothing")
    warm.add_argument("--jobs", type=int, help="compile in this many worker processes (default: the number of "
                      "cores; 1: in this process)")
    warm.add_argument("--shard", help=argparse.SUPPRESS)  # "i/n": one --jobs worker's part of the bucket set
    warm.add_argument("--convert-weights", action=argparse.BooleanOptionalAction, default=True,
                      help="also read and convert the weights into the converted-weights cache, on the host "
                      "(default: on), so the first start after warm-cache reads no checkpoint")
    add_config_flags(warm)
    warm.set_defaults(run=cmd_warm_cache)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for "
                       "every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", nargs="+", help="the name(s) clients pass as `model` (default: the "
                       "model folder's or file's name)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    serve.add_argument("--max-queued-requests", type=int, help="answer 503 (Retry-After) while this many "
                       "requests wait for a batch row (default: no limit)")
    serve.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds SIGTERM waits for running "
                       "requests to finish (default 30)")
    serve.add_argument("--quiet", action="store_true", help="no progress bars, warnings-only logs")
    add_config_flags(serve)  # --warmup/--no-warmup among them: on by default here
    serve.set_defaults(run=cmd_serve)

    bench_serve = sub.add_parser("bench-serve", help="load-test any OpenAI-compatible server (TTFT, TPOT, ITL, "
                                 "throughput)")
    from maxlike.serve.benchmark import add_arguments

    add_arguments(bench_serve)
    bench_serve.set_defaults(run=cmd_bench_serve)
    parser.commands = {"generate": gen, "list": lst, "benchmark": bench, "warm-cache": warm, "serve": serve,
                       "bench-serve": bench_serve}
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what warm-cache --jobs hands its workers
    if unknown:
        command = parser.commands[args.command]
        command.error(f"unrecognized arguments: {command.suggest(unknown)}")
    try:
        return args.run(args)
    except (ConfigError, ValueError, RuntimeError) as e:  # NotImplementedError is a RuntimeError
        print(f"maxlike: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
