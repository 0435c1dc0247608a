"""How big a decoder is and what its KV cache can hold: sequence length, weights and
activation memory (XLA's measured figure once known), the KV page plan, and the
bucket set of step shapes with its executable counts."""

from __future__ import annotations

import hashlib
import logging
import os

import jax
import jax.numpy as jnp

from maxlike.cache_files import read_json, write_json
from maxlike.config import ConfigError
from maxlike.engine import exe_cache
from maxlike.kv_cache import KVCacheParams
from maxlike.pipelines import layout, memory
from maxlike.pipelines.model import ReturnLogits, upper_bounded_default
from maxlike.weights.lean import text_config_of
from maxlike.weights import quantize
from maxlike.weights.loader import resolve_encodings
from maxlike.pipelines.registry import PIPELINE_REGISTRY
from maxlike.pipelines.serving import Bucket
from maxlike.sharding import device_bytes

from graphs.attention import KEY_BLOCK, WIDTH_ON_DEVICE, prefill_reads_blocks

log = logging.getLogger("maxlike")

DEFAULT_MAX_BATCH = 8
MIN_PREFILL_BUCKET = 16
# On accelerators the pool's page count is rounded down to a multiple of this, so that it is a
# stable function of the config and the device kind (it is part of every executable's key).
PAGE_COUNT_STEP = 64
# HBM per chip of the TPU kinds a slice can be compiled for (jax's device_kind); XLA leaves programs
# a little less ("available HBM": 15.75 of a v5e's 16 GiB).
TPU_HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v5p": 95, "TPU v6 lite": 32}


class DecoderSizing:
    """The sizing half of DecoderPipelineModel (its classmethods are PipelineModel's API)."""

    @classmethod
    def calculate_max_seq_len(cls, pipeline_config, huggingface_config) -> int:
        limit = getattr(text_config_of(huggingface_config), "max_position_embeddings", None)
        if limit is None:
            raise ConfigError("the model config has no 'max_position_embeddings', so the longest sequence it "
                              "supports is unknown: check the checkpoint's config.json.")
        try:
            return upper_bounded_default(upper_bound=limit, default=pipeline_config.model.max_length)
        except ValueError as e:
            raise ConfigError(
                f"max_length ({pipeline_config.model.max_length}) exceeds the model's limit "
                f"(max_position_embeddings={limit}): pass max_length <= {limit}."
            ) from e

    @staticmethod
    def _graph_and_config(huggingface_config):
        arch = PIPELINE_REGISTRY.retrieve_architecture(huggingface_config).graph
        return arch, arch.config_from_hf(huggingface_config)

    @classmethod
    def estimate_weights_size(cls, pipeline_config) -> int:
        return cls.weights_size_on(pipeline_config, _platform(pipeline_config))

    @classmethod
    def weights_size_on(cls, pipeline_config, platform: str) -> int:
        """estimate_weights_size for a backend ("cpu", "gpu", "tpu") other than the config's, on one device."""
        from maxlike.weights import load_hf_config

        hf = load_hf_config(pipeline_config.model.model_path)
        arch, cfg = cls._graph_and_config(hf)
        dtype = memory.resolve_dtype(pipeline_config.model.dtype, platform)
        specs = arch.weight_specs(cfg)
        encodings = resolve_encodings(pipeline_config.model, platform, specs, arch.checkpoint_names(cfg),
                                      arch.lora_targets)
        encs, kinds, specs = quantize.plan(specs, arch.lora_targets, encodings)
        specs, encs, _, _ = layout.with_quantized_head(pipeline_config, platform, None, arch, specs, encs, kinds, dtype,
                                                       stacked=layout.scan_layers(pipeline_config, platform, specs))
        return memory.weights_bytes(specs, lambda name: quantize.dtype_of(name, encs, dtype))

    @classmethod
    def estimate_activation_memory(cls, pipeline_config, huggingface_config) -> int:
        """Bytes per device of a step's temporaries: XLA's own figure (the largest
        `memory_analysis().temp_size_in_bytes` over every executable of the bucket set)
        once a warm-up or warm-cache has compiled them for this configuration, else
        an estimate from shapes."""
        path = cls._activation_profile(pipeline_config, huggingface_config)
        measured = read_json(path) if path else None
        if measured and measured.get("temp_bytes"):
            return int(measured["temp_bytes"])
        return cls._activation_estimate(pipeline_config, huggingface_config)

    @classmethod
    def _activation_estimate(cls, pipeline_config, huggingface_config) -> int:
        """From shapes: the largest prefill bucket (one row of as many tokens as a prefill step
        takes) or a full decode batch. Prefill attention holds the scores of one block of keys
        where it reads the table by blocks (graphs.attention.prefill_reads_blocks), else of them all."""
        arch, cfg = cls._graph_and_config(huggingface_config)
        max_len = cls.calculate_max_seq_len(pipeline_config, huggingface_config)
        platform = _platform(pipeline_config)
        itemsize = memory.resolve_dtype(pipeline_config.model.dtype, platform).itemsize
        batch = pipeline_config.max_batch_size or DEFAULT_MAX_BATCH
        _, kv_heads, head_dim = arch.kv_shape(cfg)
        common = dict(hidden=cfg.hidden_size, q_heads=cfg.q_heads, kv_width=kv_heads * head_dim,
                      intermediate=cfg.intermediate_size, vocab=cfg.vocab_size, itemsize=itemsize)
        tokens = max_prefill_tokens(max_len, pipeline_config.prefill_chunk_size)
        # By blocks, a block's scores, their masked maximum and probabilities: three buffers on XLA:CPU (a
        # 512-token step: 25.8 MB for 8.4 MB of scores; XLA:TPU held one).
        blocks = prefill_reads_blocks(platform, max_len, tokens * cfg.q_heads)
        keys, buffers = (KEY_BLOCK, 3) if blocks else (max_len, 2)
        prefill = memory.activation_bytes(batch=1, tokens=tokens, context=keys, logits_rows=1, score_buffers=buffers,
                                          **common)
        decode = memory.activation_bytes(batch=batch, tokens=1, context=max_len, logits_rows=1, **common)
        return max(prefill, decode)

    @classmethod
    def _activation_profile(cls, pipeline_config, huggingface_config) -> str | None:
        """The file keeping XLA's measured activation memory for this model and every setting
        that shapes its programs (None when the executable cache is off)."""
        from maxlike.engine.mesh import executable_cache_dir

        folder = executable_cache_dir(pipeline_config)
        if folder is None:
            return None
        c = pipeline_config
        arch, cfg = cls._graph_and_config(huggingface_config)
        platform = _platform(c)
        count = len(jax.devices(platform)) if not c.compile_target and c.devices is None else None
        key = repr((arch.name, cfg, c.model.dtype, cls.calculate_max_seq_len(c, huggingface_config),
                    c.max_batch_size, c.max_num_steps, c.prefill_chunk_size, c.kv_cache.kv_cache_page_size,
                    c.model.quantization_encoding, c.kv_cache.cache_dtype, c.sampling.enable_echo, c.devices, count, c.compile_target,
                    c.data_parallel_degree, c.tensor_parallel_degree, c.expert_parallel_degree, c.moe_kernel,
                    c.enable_in_flight_batching, platform, exe_cache.versions(),
                    exe_cache.program_settings(), exe_cache.source_hash()))
        return os.path.join(folder, "activations", hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")

    def record_activation_memory(self) -> None:
        """Keep XLA's measured peak temporaries (after every bucket was compiled or loaded)
        for `estimate_activation_memory` to use from now on."""
        path = self._activation_profile(self.pipeline_config, self.huggingface_config)
        if path and self.session.peak_temp_bytes:
            try:
                write_json(path, {
                    "temp_bytes": self.session.peak_temp_bytes, "buckets": len(self.step_buckets()),
                    "estimate_from_shapes": self._activation_estimate(self.pipeline_config, self.huggingface_config)})
            except OSError:  # an unwritable cache: the executable cache has warned about it
                pass

    def _plan_kv_cache(self, specs) -> tuple[KVCacheParams, int, int]:
        """(page layout, max batch size per replica, pages per replica), or a ConfigError
        saying what fits.

        CPU: a configured host budget, split over the replicas. Accelerators: one device's
        memory (`bytes_limit`) x device_memory_utilization, less its share of the weights
        and the shape-based activation estimate, over its share of a page, rounded down to
        a multiple of PAGE_COUNT_STEP: a function of the config and the device kind only,
        so every start with the same flags builds the same programs (and finds them in the
        executable cache). Only when memory already in use leaves no room for that is the
        pool shrunk to what is free.
        """
        cfg = self.kv_cache_config
        layers, kv_heads, head_dim = self.arch.kv_shape(self.config)
        dtype = self.dtype if cfg.cache_dtype == "auto" else memory.resolve_dtype(cfg.cache_dtype, self.session.platform)
        params = KVCacheParams(layers, kv_heads, head_dim, cfg.kv_cache_page_size, str(dtype))
        pages_per_seq = params.pages_for(self.max_length)
        spent = ""  # what else the budget holds, on an accelerator
        if self.session.platform == "cpu":
            budget_pages = int(cfg.host_kv_cache_memory_gib * 2**30 / self.replicas // params.page_bytes)
        else:
            stats = _memory_stats(self.devices[0])
            if "bytes_limit" not in stats:  # a compile target's devices are not here: size for the demand
                batch = self.pipeline_config.max_batch_size or DEFAULT_MAX_BATCH
                log.info("device memory of %s is unknown here: KV pool sized for %d sequences of %d tokens",
                         self.devices[0].device_kind, batch, self.max_length)
                self._check_target_fits(batch, batch * pages_per_seq + 1, params, specs)
                return params, batch, batch * pages_per_seq + 1
            weights = self._device_weights_bytes(specs)
            activations = self._activation_estimate(self.pipeline_config, self.huggingface_config)
            budget_pages = device_page_budget(
                stats, utilization=cfg.device_memory_utilization, weights_bytes=weights,
                activation_bytes=activations, page_bytes=params.page_bytes / self.tensor_parallel_degree)
            spent = (f" (of {stats['bytes_limit'] / 2**30:.1f} GiB a device x device_memory_utilization="
                     f"{cfg.device_memory_utilization}, less {weights / 2**30:.1f} GiB of weights and "
                     f"{activations / 2**30:.1f} GiB of step temporaries at this max_length)")
        if budget_pages < pages_per_seq + 1:  # + the reserved null page
            fit = max(0, budget_pages - 1) * params.page_size
            raise ConfigError(
                f"the KV cache budget{spent} holds {budget_pages} pages of {params.page_size} tokens, not enough "
                f"for one sequence of max_length={self.max_length}. What fits: max_length <= {fit} with "
                f"max_batch_size 1, or max_length <= {fit // 8} with max_batch_size 8; or raise the budget "
                "(host_kv_cache_memory_gib on CPU, device_memory_utilization on accelerators)."
            )
        batch = self.pipeline_config.max_batch_size or min(DEFAULT_MAX_BATCH, (budget_pages - 1) // pages_per_seq)
        return params, batch, min(budget_pages, batch * pages_per_seq + 1)

    def _device_weights_bytes(self, specs) -> float:
        """Bytes of the weights one device holds (split over the tensor and expert axes)."""
        return device_bytes(specs, lambda name: jnp.dtype(self._dtype_of(name)).itemsize, self.session.mesh)

    def _check_target_fits(self, batch: int, pages: int, params: KVCacheParams, specs) -> None:
        """A compile target's KV pool is sized for the demand (its free memory is not known
        here): refuse, before anything compiles, a pool and weights larger than a chip's HBM."""
        kind = self.devices[0].device_kind
        hbm = TPU_HBM_GIB.get(kind)
        if hbm is None:
            return
        tp = self.tensor_parallel_degree
        pool = pages * params.page_bytes / tp / 2**30
        weights = self._device_weights_bytes(specs) / 2**30
        if pool + weights > hbm * 0.98:
            raise ConfigError(
                f"this configuration does not fit a {kind} chip ({hbm} GiB): its KV pool, sized for max_batch_size="
                f"{batch} x max_length={self.max_length} tokens (a compile target's free memory is not known "
                f"here), needs {pool:.1f} GiB per chip beside {weights:.1f} GiB of weights. Lower "
                "--max-batch-size or --max-length, or compile for a larger slice.")

    # -- the bucket set ---------------------------------------------------
    # Decode steps are bucketed by rows (and page-table width on GPU: graphs.layers.
    # WIDTH_ON_DEVICE); prefill steps by (rows, tokens), always with the full width, so
    # the two sets add up instead of multiplying. Prefill rows x tokens stay within the
    # chunk budget.
    def _bucket_batch(self, n: int) -> int:
        return memory.bucket(n, 1, self.max_batch_size)

    def _bucket_tokens(self, n: int) -> int:
        return 1 if n == 1 else memory.bucket(n, MIN_PREFILL_BUCKET, self._max_prefill_tokens)

    @property
    def _max_prefill_tokens(self) -> int:
        return max_prefill_tokens(self.max_length, self.pipeline_config.prefill_chunk_size)

    @property
    def _max_width(self) -> int:
        return memory.next_pow2(self.kv_params.pages_for(self.max_length))

    def prefill_fits(self, rows: int, max_tokens: int) -> bool:
        """Whether a prefill batch of `rows` rows, the longest `max_tokens`, stays in a bucket."""
        return self._bucket_batch(rows) * self._bucket_tokens(max_tokens) <= self._max_prefill_tokens

    @property
    def _decode_widths(self) -> list[int]:
        """Page-table widths of decode buckets: the full width alone where attention picks the
        pages it reads on device (graphs.attention.WIDTH_ON_DEVICE), else every power of two."""
        if WIDTH_ON_DEVICE.get(self.session.platform, True):
            return [self._max_width]
        return [2**i for i in range(self._max_width.bit_length())]

    def step_buckets(self) -> list[Bucket]:
        """Every step shape a step can be compiled for: known at setup. Prefill and mixed
        steps read the full table; decode steps see `_decode_widths`. Mixed steps (in-flight
        batching) run up to rows - 1 one-token rows beside one chunk of any token bucket."""
        batches = [b for b in (2**i for i in range(self._bucket_batch(self.max_batch_size).bit_length()))]
        tokens = [t for t in (2**i for i in range(self._max_prefill_tokens.bit_length())) if t >= MIN_PREFILL_BUCKET]
        full = self._max_width
        decode = [Bucket(b, 1, w) for b in batches for w in self._decode_widths]
        prefill = [Bucket(b, t, full) for b in batches for t in tokens if b * t <= self._max_prefill_tokens]
        mixed = [Bucket(b, t, full, True) for b in batches[1:] for t in tokens] if self.in_flight_batching else []
        return decode + prefill + mixed

    def executable_counts(self, max_num_steps: int) -> dict[str, int]:
        """How many executables of each kind a full warm-up makes, in closed form (the
        README's formula). With B, T the largest batch and prefill token buckets (powers of
        two), nb = log2(B) + 1 batch buckets: decode buckets nb x nw (nw = 1, or on GPU
        log2(W) + 1 table widths), prefill buckets the sum over t = 16, 32, ..., T of
        log2(min(B, T / t)) + 1, mixed buckets (in-flight batching) (nb - 1) x nt with nt
        token buckets, and L log-prob sizes."""
        b_max, t_max = self._bucket_batch(self.max_batch_size), self._max_prefill_tokens
        nb = b_max.bit_length()
        decode = nb * len(self._decode_widths)
        prefill = sum(min(b_max, t_max // t).bit_length()
                      for t in (2**i for i in range(t_max.bit_length())) if t >= MIN_PREFILL_BUCKET)
        top_n = len(self._logprob_buckets())
        mixed = (nb - 1) * (t_max.bit_length() - MIN_PREFILL_BUCKET.bit_length() + 1) if self.in_flight_batching else 0
        return {"step": decode + prefill + mixed, "unpack_inputs": decode + prefill + mixed, "decode_loop": decode,
                "prepare_next": decode if max_num_steps > 1 else 0, "logprobs": nb * top_n,
                "echo_logprobs": prefill * top_n if self.return_logits == ReturnLogits.ALL else 0,
                "sample": nb, "sample_greedy": nb, "lora_slot": int(self.pipeline_config.lora.enable_lora)}


def device_page_budget(stats: dict, *, utilization: float, weights_bytes: float, activation_bytes: float,
                       page_bytes: float) -> int:
    """KV pages one accelerator holds: from its memory size (not from what is in use, which
    differs between a warm-cache run and a serving start), rounded down to PAGE_COUNT_STEP."""
    budget = stats["bytes_limit"] * utilization - weights_bytes - activation_bytes
    pages = max(0, int(budget // page_bytes))
    stable = pages // PAGE_COUNT_STEP * PAGE_COUNT_STEP if pages >= 2 * PAGE_COUNT_STEP else pages
    # Our own weights are not placed yet when the pool is planned: anything in use is someone else's.
    free_pages = int((stats["bytes_limit"] - stats.get("bytes_in_use", 0) - weights_bytes - activation_bytes)
                     // page_bytes)
    if max(free_pages, 0) < stable:  # (a budget that holds nothing even when the device is empty is no warning)
        log.warning("%d MiB of device memory is already in use: the KV pool shrinks from %d to %d pages, so "
                    "executables cached for the full pool do not match this start.",
                    stats.get("bytes_in_use", 0) // 2**20, stable, max(free_pages, 0))
        return max(free_pages, 0)
    return stable


def max_prefill_tokens(max_length: int, prefill_chunk_size: int) -> int:
    """The most tokens a prefill step holds (its largest bucket, rows x tokens)."""
    return memory.next_pow2(max(MIN_PREFILL_BUCKET, min(max_length, prefill_chunk_size)))


def _platform(pipeline_config) -> str:
    """The backend a config compiles for: its compile target's, else this machine's default."""
    target = pipeline_config.compile_target
    return target.partition(":")[0] if target else jax.default_backend()


def _memory_stats(device) -> dict:
    try:
        return device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - devices of a compile target (not addressable here) have none
        return {}
