"""How a decoder's weights are laid out on the device: layers as one loop or unrolled, q/k/v and
gate/up fused or apart (the per-backend defaults, from measurements), each projection kind's
quantized encoding (and the LM head's, where the Pallas matmul reads it), and whether a mesh splits
them; whether the decode-attention kernel asked for takes the model."""

from __future__ import annotations

import logging
from functools import partial

import jax
import numpy as np

from graphs.base import LAYERS, LayerOf, uniform_layers
from graphs.attention import decode_kernel, pallas_decode_takes
from graphs.base import several_devices
from graphs.layers import MatmulRun, grouped_kernel_takes
from graphs.moe import ExpertRun
from maxlike.config import ConfigError
from maxlike.sharding import LOGICAL_TO_MESH, indivisible
from maxlike.weights import quantize
from maxlike.weights.loader import resolve_encodings

log = logging.getLogger("maxlike")

# Whether layers run as one loop over stacked weights (PipelineConfig.scan_layers=None), per backend.
# TPU: a loop cuts each executable 3-16x (DESIGN.md section 8). GPU: on an H200 (Llama-3.2-1B shape,
# bf16) the loop decodes 369 vs 569 tok/s at batch 1 and 2,844 vs 4,942 at batch 8 (unroll 2: 386 /
# 2,998), with no layer slice copied (benchmarks/probe_gpu_step.py), so unrolled. CPU: see README.
SCAN_LAYERS_DEFAULT = {"tpu": True, "gpu": False, "cpu": False}
# Whether q/k/v and gate/up run as one matmul each (PipelineConfig.fuse_projections=None), per backend.
# CPU: SmolLM2 decodes 13-18% faster at batch 1 fused (3-4% slower at batch 8). TPU: compiled for a v5e,
# a fused int8 gate/up is dequantized into a buffer instead of inside the matmul (1 GiB of temporaries
# for 4 Llama-3.1-8B layers, 0.01 unfused). GPU ("float": fused when no projection is kept quantized): on an
# H200 a Llama-3.2-1B shape in bf16 decodes 655 vs 602 tok/s at batch 1 and 5,601 vs 5,539 at batch 8 fused
# (one process, the same weights; benchmarks/results/h200_decode_2026-11-29.json); quantized, not measured.
FUSE_PROJECTIONS_DEFAULT = {"tpu": False, "gpu": "float", "cpu": True}


# How mixture-of-experts layers compute their experts (PipelineConfig.moe_kernel=None), per backend
# (graphs.moe). CPU: XLA:CPU lowers ragged_dot as a masked product with every expert (plus a copy of
# their weights); one 16-expert layer (hidden 512, experts 1024 wide) took, at 1 / 3 / 8 / 32 tokens,
# grouped 46 / 59 / 60 / 76 ms, dense 4.3 / 12.3 / 13.8 / 24.6, gather 0.8 / 14.3 / 48.7 / 159, and the
# loop over the experts that have tokens 1.1 / 8.5 / 6.8 / 20.4 (benchmarks/probe_moe_kernels.py;
# whole models: README, benchmarks/bench_moe.py). GPU and TPU: not measured yet; grouped, which reads only the experts
# tokens are routed to, and which compiled for a v5e reads the [E, D, F] weights in place (no copy).
MOE_KERNEL_DEFAULT = {"tpu": "grouped", "gpu": "grouped", "cpu": "loop"}


def scan_layers(pipeline_config, platform: str, layer_specs: dict | None = None) -> bool:
    """Whether the layers run as one loop (graphs.base.run_layers): `scan_layers`, else the backend's
    default where every layer has the same weights (`layer_specs`; a model whose layers differ,
    e.g. Qwen3-MoE with dense layers among its expert layers, runs unrolled)."""
    scan = pipeline_config.scan_layers
    if scan is not None:
        return scan
    return SCAN_LAYERS_DEFAULT.get(platform, False) and (layer_specs is None or uniform_layers(layer_specs))


def quantization(pipeline_config, platform: str, arch, layer_specs: dict, source_config):
    """({projection kind: Encoding}, {kind: input axes}, per-layer specs with the scales) of the
    model (maxlike.weights.quantize.plan; empty for a float one), each kind in the encoding
    `resolve_encodings` gives it. Says so when a GGUF's own blocks are kept by default."""
    encodings = resolve_encodings(pipeline_config.model, platform, layer_specs, arch.checkpoint_names(source_config),
                                  arch.lora_targets)
    encs, kinds, specs = quantize.plan(layer_specs, arch.lora_targets, encodings)
    if encs and pipeline_config.model.quantization_encoding is None:
        log.info("keeping the GGUF's quantized blocks: %s (pass quantization_encoding to choose one)",
                 quantize.describe(encs))
        if platform == "gpu" and pipeline_config.quantized_matmul == "xla":
            log.warning("XLA:GPU decodes quantized weights slower than bfloat16 ones (an H200, Llama-3.2-1B shape: "
                        "q4_k at 0.59x, int8 at 0.96x, batch 1): quantization_encoding='bfloat16' dequantizes this "
                        "GGUF at load (more memory, faster decode); quantized_matmul='pallas' runs its int8 / q8_0 / "
                        "q4_0 / q4_k products through graphs.pallas_gpu_matmul (not yet timed)")
    return encs, kinds, specs


def expert_run(pipeline_config, platform: str, mesh, moe, encoding: str | None = None) -> ExpertRun | None:
    """How MoE layers run (graphs.moe.ExpertRun; None for a model without experts): `moe_kernel`,
    else the backend's default. `encoding`: the projections' (quantize.describe), None: float."""
    if moe is None:
        return None
    if encoding is not None:
        log.warning("quantization_encoding %s quantizes attention and dense MLP projections; the experts stay in "
                    "the model's float dtype (quantized experts are not built yet)", encoding)
    return ExpertRun(pipeline_config.moe_kernel or MOE_KERNEL_DEFAULT.get(platform, "grouped"), mesh)


def fuse_projections(pipeline_config, platform: str, quantized: bool = False) -> bool:
    """Whether q/k/v and gate/up run fused (graphs.fused): `fuse_projections`, else the backend's default
    (`quantized`: some projection is kept in a quantized encoding)."""
    fuse, lora = pipeline_config.fuse_projections, pipeline_config.lora.enable_lora
    if fuse and lora:
        raise ConfigError("fuse_projections=True cannot be combined with enable_lora: adapters update q, k, v, "
                          "gate and up apart. Leave fuse_projections unset (LoRA runs them unfused).")
    if fuse is None:
        fuse = FUSE_PROJECTIONS_DEFAULT.get(platform, False)
        fuse = not quantized if fuse == "float" else fuse
    return fuse and not lora


# Which Pallas matmul `quantized_matmul="pallas"` means, per backend (CPU: the TPU kernel, interpreted;
# tests set "gpu" here to interpret the GPU one).
PALLAS_MATMUL = {"tpu": "tpu", "gpu": "gpu", "cpu": "tpu"}


def quantized_matmul(pipeline_config, platform: str, mesh, specs: dict, encs: dict, *,
                     stacked: bool) -> tuple[MatmulRun, dict]:
    """How products with grouped weights run (graphs.layers.MatmulRun), and how the arrays the
    kernel reads are held ({name: how}, for `hold`): scales and offsets as their float16 bit
    patterns (uint16), 5/6-bit values in the kernel's layout, per device's share of their inputs.
    `quantized_matmul` "pallas" takes effect on TPU (and CPU, in interpret mode) for a model with
    weights the kernel takes as each device holds them (else a warning, and XLA's product); on
    GPU (graphs.pallas_gpu_matmul) for a quantized model on one device, each product deciding
    when it is traced (`graphs.layers._gpu_kernel`); nothing is held differently there.
    `specs` as `params` holds them."""
    if pipeline_config.quantized_matmul == "xla":
        return MatmulRun(), {}
    if PALLAS_MATMUL.get(platform) == "gpu":
        if not encs or stacked or several_devices(mesh) is not None:
            log.warning("quantized_matmul='pallas': graphs.pallas_gpu_matmul runs on one device, for weights kept "
                        "quantized (quantization_encoding int8, q8_0, q4_0 or q4_k) with the layers unrolled "
                        "(scan_layers=False, the GPU default): XLA's product runs")
            return MatmulRun(), {}
        log.info("quantized_matmul='pallas': decode's products with int8 / q8_0 / q4_0 / q4_k weights dequantize "
                 "in registers (graphs.pallas_gpu_matmul); other weights and prefill run XLA's")
        return MatmulRun("pallas", target="gpu"), {}
    from graphs import pallas_tpu_matmul

    def lead(name):  # a stacked layer axis first (the quantized head is no layer's)
        return int(stacked and name.startswith(LAYERS))

    mesh_axis = partial(_mesh_axis, mesh)
    scales = {n: specs[n + quantize.SCALE] for n in specs  # grouped products: [*lead, groups, *out] (the
              if n != "embed" and n + quantize.SCALE in specs  # embedding table's rows are gathered)
              and getattr(encs.get(quantize.kind_of(n)), "group", 0)}
    splits = {quantize.kind_of(n): (mesh_axis(s.axes[lead(n)]), mesh_axis(s.axes[lead(n) + 1]))
              for n, s in scales.items()}
    run = MatmulRun("pallas", mesh, tuple((kind, *axes) for kind, axes in sorted(splits.items())))

    def shape(name):
        a = jax.ShapeDtypeStruct(specs[name].shape, quantize.dtype_of(name, encs, np.float32))
        return LayerOf(a, 0) if lead(name) else a

    taken = [n for n in scales
             if grouped_kernel_takes(shape(n), shape(n + quantize.SCALE), run, quantize.kind_of(n))]
    if not taken:
        log.warning("quantized_matmul='pallas': no weight of this model is grouped in 4, 5, 6 or 8 bits (q4_k, "
                    "q4_0, q5_k, q6_k, q8_0) with one output axis or heads of 128, which is what "
                    "graphs.pallas_tpu_matmul takes: XLA's product runs")
        return MatmulRun(), {}
    log.info("quantized_matmul='pallas': %d weights dequantize in VMEM (graphs.pallas_tpu_matmul), e.g. %s",
             len(taken), taken[0])
    held = {n + part: ("bits",) for n in taken for part in (quantize.SCALE, quantize.OFFSET) if n + part in specs}
    for n in (n for n in taken if quantize.dtype_of(n, encs, np.float32) == np.uint8):  # packed: [in, *out]
        bits, group = pallas_tpu_matmul.form(specs[n].shape, np.uint8, scales[n].shape, lead(n))
        if bits > 4:
            inputs = run.split(quantize.kind_of(n))[0]
            held[n] = ("laid", bits, group, mesh.shape[inputs] if inputs else 1, len(scales[n].shape) - lead(n) - 1)
    return run, held


def _mesh_axis(mesh, logical: str | None) -> str | None:
    """The mesh axis splitting a logical axis, None where it is whole on each device."""
    axis = LOGICAL_TO_MESH.get(logical) if logical and mesh is not None else None
    return axis if axis and mesh.shape[axis] > 1 else None


def with_quantized_head(pipeline_config, platform: str, mesh, arch, specs: dict, encs: dict, kinds: dict, dtype, *,
                        stacked: bool):
    """(per-layer specs, encs, kinds, the table quantized or None): `quantization`'s, with the LM head
    quantized where `quantized_head` says it runs so (maxlike.weights.quantize.with_head)."""
    table = quantized_head(pipeline_config, platform, mesh, arch, specs, encs, dtype, stacked=stacked)
    return (*quantize.with_head(specs, encs, kinds, table), table) if table else (specs, encs, kinds, None)


def quantized_head(pipeline_config, platform: str, mesh, arch, specs: dict, encs: dict, dtype, *,
                   stacked: bool) -> str | None:
    """The vocabulary table ("lm_head", or the tied "embed") whose product runs quantized in the Pallas
    matmul (maxlike.weights.quantize.with_head), or None: with `quantized_matmul='pallas'`, for a model
    whose projections are kept quantized, an architecture whose graphs take it (`quantized_head`), and
    where the backend's kernel takes the [D, V] q8_0 head as each device holds it. `specs` per layer.
    Anywhere else the table stays float: XLA would rebuild the whole head dequantized in each step
    (compiled for a v5e: 0.98 GiB of temporaries for Llama-3.1-8B's head)."""
    if pipeline_config.quantized_matmul != "pallas" or not encs or not arch.quantized_head:
        return None
    table = "lm_head" if "lm_head" in specs else "embed"
    vocab, d = specs[table].shape
    group = quantize.ENCODINGS[quantize.HEAD_ENCODING].group
    if d % group:
        return None
    values = jax.ShapeDtypeStruct((d, vocab), np.int8)
    scale = jax.ShapeDtypeStruct((d // group, vocab), np.float16)
    if PALLAS_MATMUL.get(platform) == "gpu":
        from graphs import pallas_gpu_matmul

        takes = not stacked and several_devices(mesh) is None and pallas_gpu_matmul.supported(
            values.shape, values.dtype, scale.shape, 1, dtype)
    else:
        run = MatmulRun("pallas", mesh, ((quantize.HEAD, _mesh_axis(mesh, "embed"), _mesh_axis(mesh, "vocab")),))
        takes = grouped_kernel_takes(values, scale, run, quantize.HEAD)
    return table if takes else None


def hold(array, how: tuple) -> np.ndarray:
    """A host array (as maxlike.weights.quantize stores it) -> as `params` holds it for the Pallas
    matmul, `how` from `quantized_matmul`: ("bits",) float16 as uint16; ("laid", bits, group,
    parts, output axes) graphs.pallas_tpu_matmul.kernel_layout."""
    if how[0] == "bits":
        return np.asarray(array, np.float16).view(np.uint16)
    from graphs import pallas_tpu_matmul

    return pallas_tpu_matmul.kernel_layout(np.asarray(array), *how[1:])


def check_divisible(specs: dict, mesh, *, quantized: bool) -> None:
    """Refuse, before anything is read, weights the mesh cannot split evenly (quantized groups of 16
    or 32 inputs can be larger than a device's share of them)."""
    uneven = indivisible(specs, mesh)
    if uneven:
        raise ConfigError(f"tensor_parallel_degree={mesh.shape['tensor']} cannot split {len(uneven)} weight(s) "
                          f"evenly, e.g. {uneven[0]}: use a smaller degree"
                          + (" or quantization_encoding int8 (no groups)" if quantized else "") + ".")


def check_decode_attention(pipeline_config, platform: str, mesh, q_heads: int, dtype, pool) -> None:
    """Say so when `decode_attention='pallas'` cannot run this model's decode steps (the backend's
    kernel does not take its shapes): they run XLA's attention instead. `pool`: the KV pool's
    shape and dtype (jax.ShapeDtypeStruct)."""
    if pipeline_config.decode_attention != "pallas":
        return
    replicas, head_dim = pool.shape[0], pool.shape[-1]
    q = jax.ShapeDtypeStruct((replicas, 1, q_heads, head_dim), dtype)  # a row per replica
    if not pallas_decode_takes(platform, mesh, q, pool):
        module = decode_kernel(platform)[0].__name__
        log.warning("decode_attention='pallas': %s does not take this model's decode steps (%d query heads, %d KV "
                    "heads of %d, %s queries over a %s pool; see its supported()), so they run XLA's attention",
                    module, q_heads, pool.shape[-2], head_dim, np.dtype(dtype).name, np.dtype(pool.dtype).name)
