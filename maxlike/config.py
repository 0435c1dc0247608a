"""PipelineConfig and its sub-configs: frozen, typed, validated on construction.

MAX spreads one pipeline's settings over sub-configs (`.model`, `.kv_cache`,
`.sampling`, `.lora`) but lets users pass them flat:
`PipelineConfig(model_path=..., max_length=..., kv_cache_page_size=...)`.
Each flat keyword goes to the one sub-config that owns that field.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field, fields
from typing import Any

_DTYPES = ("auto", "float32", "bfloat16", "float16")
# Weights kept quantized on the device (activations in `dtype`; maxlike.weights.quantize): int8 and
# float8_e4m3fn with a float32 scale per output channel; q8_0, q4_0, q4_k and q5_k (the last two affine) in
# groups of 32 inputs and q6_k in groups of 16, with float16 scales, as llama.cpp's blocks. MAX's other names, not
# built yet, are refused by name.
QUANTIZED_ENCODINGS = ("int8", "float8_e4m3fn", "q8_0", "q4_0", "q4_k", "q5_k", "q6_k")
NOT_BUILT_ENCODINGS = ("gptq",)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class ModelConfig:
    """What to load. `model_path` is an HF directory or a `.gguf` file."""

    model_path: str = ""
    max_length: int | None = None
    dtype: str = "auto"
    quantization_encoding: str | None = None
    weight_path: tuple[str, ...] = ()  # explicit checkpoint files (relative to model_path's folder)

    def __post_init__(self) -> None:
        if self.quantization_encoding is not None:
            _check(self.quantization_encoding not in NOT_BUILT_ENCODINGS,
                   f"quantization_encoding={self.quantization_encoding!r} is not built yet: use one of "
                   f"{QUANTIZED_ENCODINGS} (weights kept quantized) or a float dtype {_DTYPES[1:]}.")
            _check(
                self.quantization_encoding in _DTYPES[1:] + QUANTIZED_ENCODINGS,
                f"quantization_encoding={self.quantization_encoding!r} is not supported: "
                f"use one of {_DTYPES[1:] + QUANTIZED_ENCODINGS} (a GGUF's Q8_0 / Q4_0 / Q4_1 / Q4_K / Q5_K / "
                "Q6_K blocks are kept by the encoding that stores them: q8_0, q4_0, q4_k, q5_k, q6_k).",
            )
            if self.dtype == "auto" and self.quantization_encoding in _DTYPES:
                object.__setattr__(self, "dtype", self.quantization_encoding)
        _check(self.dtype in _DTYPES, f"dtype={self.dtype!r} is not supported: use one of {_DTYPES}.")
        if self.max_length is not None:
            _check(
                isinstance(self.max_length, int) and self.max_length >= 1,
                f"max_length must be a positive integer, got {self.max_length!r}.",
            )
        if isinstance(self.weight_path, (str, os.PathLike)):
            object.__setattr__(self, "weight_path", (os.fspath(self.weight_path),))
        object.__setattr__(self, "model_path", os.fspath(self.model_path) if self.model_path else "")
        if self.model_path:
            check_model_path(self.model_path)


def check_model_path(path: str) -> None:
    """Fail early, naming the fix, when `path` cannot be a model."""
    if not os.path.exists(path):
        raise ConfigError(
            f"model_path {path!r} does not exist: pass a Hugging Face model directory "
            "(config.json + *.safetensors) or a .gguf file."
        )
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            ggufs = [f for f in os.listdir(path) if f.endswith(".gguf")]
            hint = f" It holds {ggufs[0]!r}: pass that file's path." if ggufs else ""
            raise ConfigError(
                f"model_path {path!r} is not a model: the directory has no config.json. "
                f"Pass a Hugging Face model directory or a .gguf file.{hint}"
            )
    elif not path.endswith(".gguf"):
        raise ConfigError(
            f"model_path {path!r} is not a model: a file must be a .gguf; "
            "for safetensors pass the directory that holds config.json."
        )


@dataclass(frozen=True)
class KVCacheConfig:
    """The paged KV cache. Pages hold `kv_cache_page_size` tokens of every layer."""

    kv_cache_page_size: int = 16
    device_memory_utilization: float = 0.9
    enable_prefix_caching: bool = False
    cache_dtype: str = "auto"
    host_kv_cache_memory_gib: float = 2.0

    def __post_init__(self) -> None:
        p = self.kv_cache_page_size
        _check(
            isinstance(p, int) and p >= 1 and p & (p - 1) == 0,
            f"kv_cache_page_size must be a power of two >= 1, got {p!r}.",
        )
        _check(
            0.0 < self.device_memory_utilization <= 1.0,
            f"device_memory_utilization must be in (0, 1], got {self.device_memory_utilization!r}.",
        )
        _check(self.cache_dtype in _DTYPES, f"cache_dtype={self.cache_dtype!r}: use one of {_DTYPES}.")
        _check(self.host_kv_cache_memory_gib > 0, "host_kv_cache_memory_gib must be > 0.")


LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")


@dataclass(frozen=True)
class SamplingConfig:
    """Pipeline-wide sampling switches (per-request knobs live in SamplingParams)."""

    enable_echo: bool = False  # keep logits for every prompt token (logprobs with echo)
    # What logprobs hold (vLLM's option and names): raw_* = the model's own distribution; processed_* =
    # the one each token was drawn from (processors, temperature, top-k, top-p, min-p; the tokens they
    # leave out at -inf). *_logits: the logits themselves instead of their log-softmax. Echoed prompt
    # positions are always raw: no sampler looked at them.
    logprobs_mode: str = "raw_logprobs"

    def __post_init__(self) -> None:
        _check(self.logprobs_mode in LOGPROBS_MODES,
               f"logprobs_mode={self.logprobs_mode!r}: use one of {', '.join(LOGPROBS_MODES)}.")


@dataclass(frozen=True)
class LoRAConfig:
    enable_lora: bool = False
    lora_paths: tuple[str, ...] = ()
    max_lora_rank: int = 16
    max_num_loras: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.lora_paths, str):
            object.__setattr__(self, "lora_paths", (self.lora_paths,))
        object.__setattr__(self, "lora_paths", tuple(self.lora_paths))
        _check(isinstance(self.max_lora_rank, int) and self.max_lora_rank >= 1,
               f"max_lora_rank must be a positive integer, got {self.max_lora_rank!r}.")
        _check(isinstance(self.max_num_loras, int) and self.max_num_loras >= 1,
               f"max_num_loras must be a positive integer, got {self.max_num_loras!r}.")
        _check(self.enable_lora or not self.lora_paths,
               "lora_paths were given but LoRA is off: pass enable_lora=True (--enable-lora) to serve them.")


_SUBCONFIGS = {"model": ModelConfig, "kv_cache": KVCacheConfig, "sampling": SamplingConfig, "lora": LoRAConfig}


@dataclass(frozen=True, init=False)
class PipelineConfig:
    """One pipeline's configuration; flat keyword arguments go to their sub-config."""

    model: ModelConfig = field(default_factory=ModelConfig)
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    max_batch_size: int | None = None
    max_num_steps: int | None = None  # decode steps per host call; None: 1 on CPU, 10 on accelerators
    prefill_chunk_size: int = 8192  # prompt tokens per prefill step (MAX's default)
    # Dispatch the next decode block before reading the last one's tokens. Off: on an H100 it measured
    # 468 vs 500 tok/s (batch 1, 10 steps per call) and 216 vs 260 (1 step per call); see README.
    async_scheduling: bool = False
    # MAX's name: while prompts are being prefilled, each step also carries one new token of every
    # running request (decode rows and one prompt chunk per replica in one step), so arriving prompts
    # do not pause running streams. Off by default, as in MAX: it adds the mixed steps' buckets.
    enable_in_flight_batching: bool = False
    devices: str | None = None  # "all" (default), "4" (the first 4), "0,1", "gpu:0,1"
    data_parallel_degree: int | None = None  # replicas; None: what tensor parallelism leaves
    tensor_parallel_degree: int | None = None  # None: the widest split the model allows
    # A mixture-of-experts model's experts split over this many devices (each holds experts / degree of
    # them, attention whole); combines with the two above. None: 1.
    expert_parallel_degree: int | None = None
    coordinator_address: str | None = None  # multi-host: "host:port" of process 0 (jax.distributed)
    num_processes: int | None = None
    process_id: int | None = None
    coordinator_timeout_s: int = 60  # give up joining the multi-host job after this long
    cache_dir: str | None = None  # ahead-of-time executables; None: $MAXLIKE_CACHE_DIR or ~/.cache/maxlike
    executable_cache: bool = True  # read and write serialized executables under cache_dir
    weights_cache: bool = True  # keep converted weights (orbax checkpoint) under cache_dir for fast reloads
    compile_only: bool = False  # build from abstract weights and compile every bucket; allocate nothing
    # Compile-only for hardware this machine lacks: "tpu:<topology>" (e.g. "tpu:v5e:2x2", needs libtpu,
    # `pip install 'maxlike[tpu]'`). None: this machine's devices.
    compile_target: str | None = None
    warmup: bool = False  # compile every bucket at load (with a progress bar)
    forbid_compile: bool = False  # after warm-up, any compile is an error
    seed: int = 0
    # Layers as one loop (`lax.scan`) over stacked weights: executables and compile time that do not
    # grow with depth. None: per backend (on for TPU; off for CPU and GPU, where unrolled decodes faster).
    scan_layers: bool | None = None
    # q/k/v and gate/up as one matmul each (graphs.fused; not with LoRA, whose adapters target them
    # apart). None: per backend (on for CPU, where it measured faster; off for GPU and TPU for now).
    fuse_projections: bool | None = None
    # Decode attention: "xla" (graphs.attention, every backend) or "pallas", the backend's kernel: Mosaic on TPU
    # (graphs.pallas_tpu_attention), Triton on GPU (graphs.pallas_attention; in interpret mode on CPU). Not yet
    # timed on a GPU or a TPU, so the default nowhere.
    decode_attention: str = "xla"
    # Products with grouped weights (q4_k, q4_0, q5_k, q6_k, q8_0) of one output axis (o, gate, up, down) or of
    # heads of 128 (q, k, v): "xla" rebuilds the float weight for XLA's matmul, which XLA:TPU does in a buffer; "pallas"
    # dequantizes each tile in VMEM (graphs.pallas_tpu_matmul; Mosaic on TPU, interpret mode elsewhere; per
    # device under a mesh). On GPU "pallas" is graphs.pallas_gpu_matmul (Triton): decode's products with int8,
    # q8_0, q4_0 and q4_k weights, one device. With "pallas" a quantized model's LM head is held in q8_0 too
    # ([hidden, vocabulary]; the embedding table then in q8_0 by rows, tied or not) where the kernel takes it
    # (maxlike.pipelines.layout.quantized_head). Not yet timed on a TPU or a GPU, so the default nowhere.
    quantized_matmul: str = "xla"
    # How a mixture-of-experts model computes its experts: "grouped" (tokens sorted by expert, one
    # jax.lax.ragged_dot per projection), "dense" (every expert on every token, weighted; the reference),
    # "gather" (each token gathers its experts' weights) or "loop" (the experts that have tokens, one
    # after another). None: per backend (maxlike.pipelines.layout.MOE_KERNEL_DEFAULT, measured).
    moe_kernel: str | None = None

    def __init__(self, **kwargs: Any) -> None:
        own = {f.name for f in fields(PipelineConfig)} - set(_SUBCONFIGS)
        routed: dict[str, dict[str, Any]] = {name: {} for name in _SUBCONFIGS}
        values: dict[str, Any] = {}
        for key, value in kwargs.items():
            if key in _SUBCONFIGS:
                if not isinstance(value, _SUBCONFIGS[key]):
                    raise ConfigError(f"{key}= must be a {_SUBCONFIGS[key].__name__}, got {type(value).__name__}.")
                values[key] = value
            elif key in own:
                values[key] = value
            else:
                owner = next((n for n, c in _SUBCONFIGS.items() if key in {f.name for f in fields(c)}), None)
                if owner is None:
                    raise ConfigError(_unknown_key_message(key))
                routed[owner][key] = value
        for name, cls in _SUBCONFIGS.items():
            base = values.get(name, cls())
            if routed[name]:
                base = dataclasses.replace(base, **routed[name])
            values[name] = base
        for f in fields(PipelineConfig):
            if f.name not in values:
                values[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            object.__setattr__(self, f.name, values[f.name])
        self._validate()

    def _validate(self) -> None:
        _check(bool(self.model.model_path), "model_path is required: pass a Hugging Face directory or a .gguf file.")
        if self.max_batch_size is not None:
            _check(
                isinstance(self.max_batch_size, int) and self.max_batch_size >= 1,
                f"max_batch_size must be a positive integer, got {self.max_batch_size!r}.",
            )
        _check(
            self.max_num_steps is None or (isinstance(self.max_num_steps, int) and self.max_num_steps >= 1),
            f"max_num_steps must be a positive integer, got {self.max_num_steps!r}.",
        )
        _check(
            isinstance(self.prefill_chunk_size, int) and self.prefill_chunk_size >= 1,
            f"prefill_chunk_size must be a positive integer, got {self.prefill_chunk_size!r}.",
        )
        for name in ("data_parallel_degree", "tensor_parallel_degree", "expert_parallel_degree", "num_processes"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and value >= 1),
                   f"{name} must be a positive integer, got {value!r}.")
        if self.devices is not None and not isinstance(self.devices, str):
            devices = list(self.devices)  # jax devices: kept as "platform:id,id"
            platform = getattr(devices[0], "platform", "") if devices else ""
            ids = ",".join(str(getattr(d, "id", d)) for d in devices)
            object.__setattr__(self, "devices", f"{platform}:{ids}" if platform else ids)
        multi = (self.coordinator_address, self.num_processes, self.process_id)
        _check(all(v is None for v in multi) or all(v is not None for v in multi),
               "multi-host needs coordinator_address, num_processes and process_id together.")
        if self.process_id is not None:
            _check(isinstance(self.process_id, int) and 0 <= self.process_id < self.num_processes,
                   f"process_id must be in [0, num_processes={self.num_processes}), got {self.process_id!r}.")
        if self.compile_target is not None:
            _check(self.compile_only, f"compile_target={self.compile_target!r} needs compile_only=True: a model "
                   "compiled for other hardware cannot run here.")
            _check(self.devices is None or str(self.devices).strip().isdigit(),
                   f"compile_target and devices={self.devices!r} exclude each other: the target's devices are the "
                   "ones compiled for (a count such as devices='1' takes that many of them).")
        _check(self.moe_kernel in (None, "grouped", "dense", "gather", "loop"),
               f"moe_kernel={self.moe_kernel!r} is not built: use 'grouped', 'dense', 'gather' or 'loop'.")
        _check(self.decode_attention in ("xla", "pallas"),
               f"decode_attention={self.decode_attention!r} is not built: use 'xla' or 'pallas'.")
        _check(self.quantized_matmul in ("xla", "pallas"),
               f"quantized_matmul={self.quantized_matmul!r} is not built: use 'xla' or 'pallas'.")
        _check(self.warmup or not self.forbid_compile,
               "forbid_compile needs warmup=True: without a warm-up the first request must compile.")

    def replace(self, **kwargs: Any) -> "PipelineConfig":
        """A copy with some fields changed (flat names allowed)."""
        flat = {f.name: getattr(self, f.name) for f in fields(PipelineConfig)}
        for name in _SUBCONFIGS:
            sub_fields = {f.name for f in fields(_SUBCONFIGS[name])}
            mine = {k: kwargs.pop(k) for k in list(kwargs) if k in sub_fields}
            if mine:
                flat[name] = dataclasses.replace(flat[name], **mine)
        flat.update(kwargs)
        return PipelineConfig(**flat)

    @staticmethod
    def flag_fields() -> dict[str, dataclasses.Field]:
        """Every flat field name (CLI flags are these in kebab case) -> its dataclass field."""
        out = {f.name: f for f in fields(PipelineConfig) if f.name not in _SUBCONFIGS}
        for cls in _SUBCONFIGS.values():
            out.update({f.name: f for f in fields(cls)})
        return out

    @staticmethod
    def flag_types() -> dict[str, Any]:
        """Every flat field name -> its declared type, resolved (`int | None`, `tuple[str, ...]`, ...)."""
        out = {name: hint for name, hint in typing.get_type_hints(PipelineConfig).items() if name not in _SUBCONFIGS}
        for cls in _SUBCONFIGS.values():
            out.update(typing.get_type_hints(cls))
        return {name: out[name] for name in PipelineConfig.flag_fields()}


def _unknown_key_message(key: str) -> str:
    names = sorted(PipelineConfig.flag_fields())
    close = difflib.get_close_matches(key, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else f" Known fields: {', '.join(names)}."
    return f"PipelineConfig got an unknown field {key!r}.{hint}"
