"""The `maxlike` command: generate, list, benchmark, warm-cache (serve comes later).

Every PipelineConfig field is a flag in kebab case (`--max-length`,
`--kv-cache-page-size`, ...), so one config reads the same as flags or kwargs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from maxlike.config import ConfigError, PipelineConfig


def _flag_type(field) -> dict[str, Any]:
    ann = str(field.type)
    if ann.startswith("bool"):
        return {"action": argparse.BooleanOptionalAction}
    if ann.startswith("tuple"):
        return {"nargs": "+"}
    if "int" in ann:
        return {"type": int}
    if "float" in ann:
        return {"type": float}
    return {"type": str}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pipeline config (PipelineConfig fields)")
    for name, field in PipelineConfig.flag_fields().items():
        group.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **_flag_type(field))


def config_from_args(args: argparse.Namespace, *, default_model: bool = False) -> PipelineConfig:
    values = {k: v for k, v in vars(args).items() if k in PipelineConfig.flag_fields() and v is not None}
    if "weight_path" in values:
        values["weight_path"] = tuple(values["weight_path"])
    if not values.get("model_path") and default_model:
        from maxlike.entrypoints.llm import default_model_path

        values["model_path"] = default_model_path()
    return PipelineConfig(**values)


def _sampling(args):
    from maxlike.interfaces import GREEDY, SamplingParams

    if args.temperature is None and args.top_k is None and args.top_p is None:
        return GREEDY.replace(seed=args.sampling_seed)
    return SamplingParams(temperature=1.0 if args.temperature is None else args.temperature,
                          top_k=-1 if args.top_k is None else args.top_k,
                          top_p=1.0 if args.top_p is None else args.top_p, seed=args.sampling_seed)


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
    req = (TextGenerationRequest(rid, messages=[{"role": "user", "content": args.prompt}], sampling_params=params)
           if args.chat else TextGenerationRequest(rid, prompt=args.prompt, sampling_params=params))
    t1 = time.perf_counter()
    import jax

    lead = jax.process_index() == 0  # a multi-host job prints once
    for piece in llm.stream(req):
        if lead:
            print(piece, end="", flush=True)
    if lead:
        print()
    if args.verbose:
        stats = llm.pipeline.model.session.stats.as_dict()
        print(f"[maxlike] load {t1 - t0:.1f}s, generate {time.perf_counter() - t1:.1f}s, "
              f"compiled {stats['compiled']} executables in {stats['compile_seconds']:.1f}s, loaded {stats['loaded']} "
              f"from the executable cache in {stats['load_seconds']:.1f}s", file=sys.stderr)
    return 0


def cmd_list(args) -> int:
    from maxlike.pipelines.registry import PIPELINE_REGISTRY

    for name, arch in sorted(PIPELINE_REGISTRY.architectures.items()):
        print(f"{name:24s} model_type={','.join(arch.graph.model_types)}")
    return 0


def cmd_benchmark(args) -> int:
    from maxlike.entrypoints.bench import run_decode_benchmark

    config = config_from_args(args, default_model=True)
    run_decode_benchmark(config, batch_sizes=args.batch_sizes, new_tokens=args.max_new_tokens,
                         prompt_tokens=args.prompt_tokens)
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
    t0 = time.perf_counter()
    _, pipeline = PIPELINE_REGISTRY.retrieve(config, progress=not args.quiet)
    pipeline.compile_all(progress=not args.quiet)
    stats = pipeline.model.session.stats
    print(f"warm-cache: {stats.compiled + stats.loaded} executables for {len(pipeline.model.step_buckets())} buckets "
          f"({stats.compiled} compiled in {stats.compile_seconds:.1f}s, {stats.loaded} already cached), "
          f"{stats.cached_bytes / 2**20:.1f} MiB written to {executable_cache_dir(config)} "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_not_built(name: str, issue: str):
    def run(args) -> int:
        print(f"maxlike {name}: not built yet ({issue}).", file=sys.stderr)
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maxlike", description="LLM inference on JAX/XLA with MAX's pipeline API.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt (streams to stdout)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--sampling-seed", type=int)
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
    add_config_flags(bench)
    bench.set_defaults(run=cmd_benchmark)

    warm = sub.add_parser("warm-cache", help="compile every executable into the ahead-of-time cache")
    warm.add_argument("--target", help="cpu or gpu (this machine's backend, the default), or tpu:<topology> such "
                      "as tpu:v5e:2x2 to compile for a TPU slice this machine lacks (needs maxlike[tpu])")
    warm.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flags(warm)
    warm.set_defaults(run=cmd_warm_cache)

    for name, issue in (("serve", "the OpenAI-compatible server is a later issue"),):
        p = sub.add_parser(name, help=f"(not built yet: {issue})")
        p.set_defaults(run=cmd_not_built(name, issue))
    return parser


def _unknown_flags(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> None:
    import difflib

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    known = [o for a in sub._actions for o in a.option_strings]
    hints = []
    for flag in (u.split("=")[0] for u in unknown if u.startswith("-")):
        close = difflib.get_close_matches(flag, known, n=1)
        hints.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
    sub.error(f"unrecognized arguments: {', '.join(hints) or ' '.join(unknown)}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _unknown_flags(parser, args.command, unknown)
    try:
        return args.run(args)
    except (ConfigError, ValueError, RuntimeError) as e:  # NotImplementedError is a RuntimeError
        print(f"maxlike: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
