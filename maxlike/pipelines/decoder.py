"""The generic decoder PipelineModel: serves every architecture in `graphs/`.

Weights are placed with their logical shardings; each step is one compiled
executable per bucket of (batch, tokens) (and page-table width for decode on GPU;
with in-flight batching also decode rows beside a prompt chunk, see `_mixed_rows`),
with the KV pool donated and returned updated. With LoRA, the adapter slots
(maxlike.pipelines.lora) are read beside the weights. Elsewhere the page table is always
as wide as the longest sequence needs and decode attention chooses on device how
much of it to read (graphs.attention.paged_attention).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from maxlike.cache_files import cache_root, defining_files, files_hash
from maxlike.config import ConfigError
from maxlike.kv_cache import KVCacheInputs, PagedKVCacheManager
from maxlike.pipelines import layout, logprobs, memory, sampling
from maxlike.pipelines.context import TextContext
from maxlike.pipelines.lora import LoRAManager
from maxlike.pipelines.model import ModelInputs, ModelOutputs, ReturnHiddenStates, ReturnLogits
from maxlike.pipelines.logprobs import LogProbsMixin
from maxlike.pipelines.serving import BucketShapes, ServingModel
from maxlike.pipelines.sizing import DecoderSizing
from maxlike.pipelines.step_inputs import next_inputs, place_replicated, place_sharded, unpack
from maxlike.sharding import named_sharding, replicated
from maxlike.weights import converted, quantize, read_weights

from graphs.base import stack_layers, stacked_specs
from graphs.fused import GROUPS as FUSED_GROUPS
from graphs.fused import fuse_specs, fuse_weights
from graphs.rope import at_length
from graphs.attention import AttentionRun, GroupedPageTable

STOP_SLOTS = 8  # stop ids per row the on-device decode loop checks; any further ones stop on the host


class DecoderPipelineModel(DecoderSizing, LogProbsMixin, ServingModel):
    """One decoder for every `graphs/` architecture (found through the registry)."""

    def __init__(self, pipeline_config, session, devices, kv_cache_config, weights, adapter, return_logits,
                 return_hidden_states=ReturnHiddenStates.NONE, *, progress: bool = True) -> None:
        super().__init__(pipeline_config, session, devices, kv_cache_config, weights, adapter, return_logits,
                         return_hidden_states)
        hf = self.huggingface_config
        self.arch, self.config = (adapter, adapter.config_from_hf(hf)) if adapter is not None else \
            self._graph_and_config(hf)
        self.stop_slots = STOP_SLOTS
        self.in_flight_batching = pipeline_config.enable_in_flight_batching
        if self.in_flight_batching and (return_logits != ReturnLogits.LAST_TOKEN
                                        or return_hidden_states == ReturnHiddenStates.ALL):
            raise ConfigError("enable_in_flight_batching runs one-token rows and prompt chunks in one step, which "
                              "returns each row's last logits only: it cannot be combined with enable_echo (or "
                              "every token's logits or hidden states); turn one of them off.")
        self.max_length = self.calculate_max_seq_len(pipeline_config, hf)
        self.config = at_length(self.config, self.max_length)  # RoPE that depends on the longest sequence
        mesh = session.mesh
        self.replicas, self.tensor_parallel_degree = mesh.shape["data"], mesh.shape["tensor"]
        self._source_config = self.config  # as the checkpoint stores it (before KV heads are repeated)
        # KV heads fewer than the tensor degree are repeated so every device holds the one its queries use.
        self.kv_repeat = max(1, self.tensor_parallel_degree // self.config.kv_heads)
        if self.kv_repeat > 1:
            self.config = dataclasses.replace(self.config, kv_heads=self.config.kv_heads * self.kv_repeat)
        self._layer_specs = self.arch.weight_specs(self.config)  # per layer, as checkpoints hold them
        self.scan_layers = layout.scan_layers(pipeline_config, session.platform, self._layer_specs)
        # Quantized weights: the projections kept in their kind's encoding with their scales
        self._encodings, self._quantized, self._layer_specs = layout.quantization(
            pipeline_config, session.platform, self.arch, self._layer_specs, self._source_config)
        # ... and the LM head too where the Pallas matmul runs it (the vocabulary table held as "head")
        self._layer_specs, self._encodings, self._quantized, self._head_table = layout.with_quantized_head(
            pipeline_config, session.platform, mesh, self.arch, self._layer_specs, self._encodings, self._quantized,
            self.dtype, stacked=self.scan_layers)
        self.encoding = quantize.describe(self._encodings)
        self.experts = layout.expert_run(pipeline_config, session.platform, mesh, getattr(self.config, "moe", None),
                                         self.encoding)  # None: a model without experts
        self.fused = layout.fuse_projections(pipeline_config, session.platform, bool(self._encodings))
        self._fused = {}  # q/k/v and gate/up fuse where stored alike (a Q4_K_M GGUF's v is q6_k, its q and k q4_k)
        if self.fused:
            self._fused, self._encodings, self._quantized = quantize.fusable(self._encodings, self._quantized,
                                                                             FUSED_GROUPS)
        specs = fuse_specs(self._layer_specs, self.config.kv_heads, self._fused) if self.fused else self._layer_specs
        specs = stacked_specs(specs) if self.scan_layers else specs
        layout.check_divisible(specs, mesh, quantized=bool(self._encodings))
        self._specs = specs  # as `params` holds them
        # (the arrays the Pallas matmul reads are held its way: layout.hold)
        self.matmul, self._held = layout.quantized_matmul(pipeline_config, session.platform, mesh, specs,
                                                             self._encodings, stacked=self.scan_layers)
        self.weights_source = "none (compile-only)"  # or where `params` came from
        self.kv_params, self.max_batch_size, num_pages = self._plan_kv_cache(specs)
        self.compile_only = pipeline_config.compile_only
        # float32 means float32 matmuls on every backend (not TF32 on GPU, not bf16 passes on TPU).
        session.matmul_precision = "highest" if self.dtype == np.float32 else None
        session.cache_namespace.update(self._cache_identity(num_pages))
        if pipeline_config.lora.enable_lora:  # adapters are read and checked before the pool or weights exist
            self._lora_manager = LoRAManager(
                pipeline_config.lora, layer_specs=self.arch.weight_specs(self.config),
                source_specs=self.arch.weight_specs(
                    self._source_config), lora_targets=self.arch.lora_targets, mesh=mesh, dtype=self.dtype,
                kv_repeat=self.kv_repeat, stacked=self.scan_layers, session=session, abstract=self.compile_only)
        if not self.compile_only:
            session.prefetch()  # executables load in the background while the weights do
        self.kv_manager = PagedKVCacheManager(self.kv_params, num_pages, mesh, replicas=self.replicas,
                                              enable_prefix_caching=kv_cache_config.enable_prefix_caching,
                                              allocate=not self.compile_only, stacked=self.scan_layers,
                                              window=self.sliding_window_everywhere)
        layout.check_decode_attention(pipeline_config, session.platform, mesh, self.config.q_heads, self.dtype,
                                      jax.ShapeDtypeStruct(self.kv_manager.pool_shape, self.kv_params.dtype))
        if self.compile_only:  # shapes and shardings only: nothing is read or allocated
            self.params = {name: jax.ShapeDtypeStruct(spec.shape, self._dtype_of(name),
                                                      sharding=named_sharding(mesh, spec.axes))
                           for name, spec in specs.items()}
            pool = jax.ShapeDtypeStruct(self.kv_manager.pool_shape, self.kv_params.dtype,
                                        sharding=self.kv_manager.pool_sharding)
            self.kv_manager.pool = [(pool, pool) for _ in range(self.kv_manager.pool_groups)]
        else:
            try:
                self.params = self._load_params(weights, progress)
            finally:
                session.wait_prefetch()
        self._replicated = replicated(mesh)
        self._by_row = named_sharding(mesh, ("batch",))  # step inputs: rows split over the replicas
        self._greedy_sampling: dict[int, sampling.SamplingInputs] = {}

    def _weights(self) -> dict:
        """What the step reads: the base weights and, with LoRA, the adapter slots."""
        lora = self._lora_manager
        return self.params if lora is None else {**self.params, **lora.arrays}

    def _load_params(self, weights, progress: bool) -> dict[str, jax.Array]:
        """Weights on the mesh: restored from the converted-weights cache when it holds this
        model's conversion, else read, converted and placed shard by shard (then cached)."""
        mesh, specs = self.session.mesh, self._specs
        shardings = {name: named_sharding(mesh, spec.axes) for name, spec in specs.items()}
        checkpoint = self._weights_checkpoint() if weights is None else None
        if checkpoint is not None:
            abstract = {name: jax.ShapeDtypeStruct(spec.shape, self._dtype_of(name), sharding=shardings[name])
                        for name, spec in specs.items()}
            params = converted.restore(checkpoint, abstract)
            if params is not None:
                self.weights_source = "converted-weights cache"
                return params
        if weights is not None:
            self.weights_source = "weights passed to the model"
        host = self._to_layout(weights if weights is not None else self._read_weights(progress))
        # Every file was checked and read, and the KV cache planned, before the first device allocation.
        params = {name: place_sharded(host[name], shardings[name], self._dtype_of(name))
                  for name in tqdm(specs, desc="placing weights", unit="tensor", disable=not progress)}
        del host
        if checkpoint is not None:
            converted.save(checkpoint, params)
        return params

    def _read_weights(self, progress: bool) -> dict[str, np.ndarray]:
        """Host arrays in our layout and dtype (KV heads not yet repeated for the mesh)."""
        cfg, source_config = self.pipeline_config, self._source_config
        self.weights_source = "checkpoint files"
        specs = self.arch.weight_specs(source_config)
        keep = {name: (self._encodings[quantize.kind_of(name)], n_in)
                for name, n_in in quantize.linear_inputs(specs, self._quantized).items()}
        return read_weights(cfg.model.model_path, specs, self.arch.checkpoint_names(source_config),
                            np.float32 if self._quantized else self.dtype, progress=progress,
                            weight_path=cfg.model.weight_path, keep=keep)

    def _weights_checkpoint(self) -> str | None:
        """This conversion's folder in the converted-weights cache (None when the cache is off)."""
        cfg = self.pipeline_config
        if not cfg.weights_cache or jax.process_count() > 1:
            return None
        conversion = (self.arch.name, str(self.dtype), self.kv_repeat, self.encoding,
                      tuple((name, spec.shape) for name, spec in self._specs.items()),
                      tuple(sorted(self._held.items())))
        return converted.checkpoint_dir(cfg.cache_dir or cache_root(), cfg.model.model_path, cfg.model.weight_path,
                                        conversion, code=self.arch.functions())

    def convert_weights(self, progress: bool = True) -> str | None:
        """Compile-only: read and convert the weights into the converted-weights cache, on the
        host (nothing is placed on a device), unless they are there already. Returns the
        checkpoint folder, or None when the cache is off or could not be written."""
        checkpoint = self._weights_checkpoint()
        if checkpoint is None or os.path.isdir(checkpoint):
            return checkpoint
        host = self._to_layout(self._read_weights(progress))
        return checkpoint if converted.save(checkpoint, host) else None

    def _cache_identity(self, num_pages: int) -> dict[str, str]:
        """What makes this model's programs differ from another's (the executable cache's key parts).
        `code` hashes the architecture's and this class's source wherever they live, so an
        architecture registered from outside maxlike misses the cache when its code changes."""
        program = repr((type(self).__name__, self.arch.name, self.config, str(self.dtype), self.encoding,
                        self.kv_params, num_pages,
                        self.replicas, self.max_batch_size, self.max_length, self._max_prefill_tokens,
                        self.return_logits, self.return_hidden_states, self.scan_layers, self.fused,
                        self.pipeline_config.decode_attention, self.experts and self.experts.kernel, self.matmul.kernel,
                        self.session.matmul_precision, self._lora_shape()))
        classes = [c for c in type(self).__mro__ if c.__module__ not in ("builtins", "abc", "typing")]
        return {"model": hashlib.sha256(program.encode()).hexdigest()[:16], "architecture": self.arch.name,
                "code": files_hash(defining_files(*self.arch.functions(), *classes)),
                "dtype": str(self.dtype), "max_batch_size": str(self.max_batch_size),
                "max_length": str(self.max_length), "kv_pages": str(num_pages)}

    def _lora_shape(self) -> tuple | None:
        """What LoRA adds to the programs: slots and rank (the adapters' values are data)."""
        lora = self.pipeline_config.lora
        return (lora.max_num_loras, lora.max_lora_rank, tuple(self.arch.lora_targets)) if lora.enable_lora else None

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def _check_runnable(self) -> None:
        if self.compile_only:
            raise RuntimeError("this model was built compile-only (PipelineConfig(compile_only=True)): it holds no "
                               "weights or KV cache and cannot run; build it again without compile_only to run it.")

    def _to_layout(self, host: dict) -> dict:
        """Host arrays as the checkpoint gives them (per layer) -> as `params` holds them:
        KV heads repeated for the mesh, projections quantized and fused, layers stacked when they
        run as one loop, what the Pallas matmul reads held its way (layout.hold)."""
        if self._head_table:
            host = quantize.head_from_table(host, self._head_table, self._encodings)
        host = {name: self._repeat_kv(host[name], spec) for name, spec in self._layer_specs.items() if name in host}
        if self._quantized:
            host = quantize.quantize_host(host, quantize.linear_inputs(host, self._quantized), self._encodings)
        if self.fused:
            host = fuse_weights(host, self.config.kv_heads, self._fused)
        host = stack_layers(host) if self.scan_layers else host
        return {name: layout.hold(a, self._held[name]) if name in self._held else a for name, a in host.items()}

    def _dtype_of(self, name: str):
        """A parameter's dtype: the model's, or the encoding's for quantized projections and their scales
        (uint16 for float16 scales held as bit patterns)."""
        if self._held.get(name) == ("bits",):
            return np.dtype(np.uint16)
        return quantize.dtype_of(name, self._encodings, self.dtype)

    def _repeat_kv(self, array, spec) -> np.ndarray:
        if self.kv_repeat == 1 or "kv_heads" not in spec.axes:
            return array
        return np.repeat(np.asarray(array), self.kv_repeat, axis=spec.axes.index("kv_heads"))

    # -- input preparation ------------------------------------------------

    def prepare_initial_token_inputs(self, replica_batches: Sequence[Sequence[TextContext]],
                                     kv_cache_inputs: KVCacheInputs | None = None,
                                     return_n_logits: int = 1) -> ModelInputs:
        """One step's inputs. `replica_batches[r]` runs on data-parallel replica r; each is
        padded to the same bucket of rows and the rows laid out replica by replica.

        Every context must already hold KV pages on its replica for the tokens this step
        writes (`kv_manager.claim(request_id, total_tokens=...)`, then `reserve` as it
        grows): nothing is claimed here, so a failure changes nothing.
        """
        self._check_runnable()
        if len(replica_batches) != self.replicas:
            raise ValueError(f"this model runs {self.replicas} replica(s); got {len(replica_batches)} replica batches.")
        sizes = [len(b) for b in replica_batches]
        if not any(sizes) or max(sizes) > self.max_batch_size:
            raise ValueError(f"each replica batch needs 0..{self.max_batch_size} contexts (and one at least "
                             f"1), got {sizes}.")
        kv = self.kv_manager
        page = self.kv_params.page_size
        seen: set[str] = set()
        for r, replica_batch in enumerate(replica_batches):
            for ctx in replica_batch:
                self._check_pages(ctx, r, seen)
        mixed = self._mixed_rows(replica_batches)
        batch: list[TextContext | None] = []
        if mixed is None:  # rows [B, T], each row's tokens padded to T
            per_replica = self._bucket_batch(max(sizes))
            for replica_batch in replica_batches:
                batch += list(replica_batch) + [None] * (per_replica - len(replica_batch))
        else:  # per replica: mixed - 1 one-token rows, then its prompt chunk
            for replica_batch in replica_batches:
                singles = [c for c in replica_batch if len(c.next_tokens) == 1]
                chunk = [c for c in replica_batch if len(c.next_tokens) > 1]
                batch += singles + [None] * (mixed - 1 - len(singles)) + (chunk or [None])
        live = [c for c in batch if c is not None]
        lengths = [len(c.next_tokens) if c is not None else 0 for c in batch]
        rows = len(batch)
        if max(lengths) > self._max_prefill_tokens:
            raise ValueError(f"a step processes at most {self._max_prefill_tokens} tokens per row, got {max(lengths)}: "
                             "chunk the prompt (TextContext.chunk) or raise prefill_chunk_size.")
        t = self._bucket_tokens(max(lengths))
        widths = self._decode_widths
        width = widths[-1] if t > 1 else memory.bucket(max(kv.num_pages_of(c.request_id) for c in live), widths[0],
                                                        widths[-1])
        if self.return_logits == ReturnLogits.ALL:
            n_logits = t
        elif self.return_logits == ReturnLogits.VARIABLE:
            n_logits = min(return_n_logits, t)
        else:
            n_logits = 1
        ids = [c.request_id if c is not None else None for c in batch]
        table = kv.page_table(ids, width) if kv_cache_inputs is None else np.asarray(kv_cache_inputs.page_table)
        # Where row i's tokens start: (row, column) of the [B, T] arrays, or in a mixed step
        # (replica, offset) of its flat [R, mixed - 1 + T] ones (see graphs.attention.GroupedPageTable).
        place = (lambda i: (i, 0)) if mixed is None else (lambda i: divmod(i, mixed))
        shape = (rows, t) if mixed is None else (self.replicas, mixed - 1 + t)
        tokens = np.zeros(shape, np.int32)
        positions = np.zeros(shape, np.int32)
        slots = np.zeros(shape, np.int32)
        logit_idx = np.zeros((rows, n_logits), np.int32)
        starts = np.zeros((rows,), np.int32)
        counts, ends, capacity = [0] * rows, [0] * rows, [0] * rows
        for r, ctx in enumerate(batch):
            if ctx is None:
                continue
            n, start = lengths[r], ctx.cache_length
            pos = start + np.arange(n)
            a, at = place(r)
            tokens[a, at : at + n] = ctx.next_tokens
            positions[a, at : at + n] = pos
            slots[a, at : at + n] = table[r, pos // page] * page + pos % page
            k = min(n_logits, n)
            logit_idx[r, n_logits - k:] = at + np.arange(n - k, n)
            logit_idx[r, : n_logits - k] = at + n - k
            starts[r] = start
            counts[r], ends[r] = k, start + n
            capacity[r] = min(kv.num_pages_of(ctx.request_id), width) * page
        host = dict(tokens=tokens, positions=positions, slots=slots, logit_indices=logit_idx,
                    input_lengths=np.asarray(lengths, np.int32), page_table=np.asarray(table, np.int32),
                    cache_lengths=starts)
        if self._lora_manager is not None:
            slot_of = self._lora_manager.slot_of
            host["adapters"] = np.asarray([0 if c is None else slot_of(c.lora_name) for c in batch], np.int32)
        inputs = self._place(host)
        return inputs.replace(request_ids=tuple(c.request_id for c in live), logit_counts=tuple(counts),
                              row_ids=tuple(ids), written_end=tuple(ends), capacity=tuple(capacity))

    def _mixed_rows(self, replica_batches) -> int | None:
        """Rows per replica of the mixed step that runs this batch (its one-token rows, then
        one prompt chunk per replica), or None when the batch runs as rows [B, T]: in-flight
        batching off, no one-token row, or a replica with no chunk or more than one."""
        if not self.in_flight_batching:
            return None
        chunks = [sum(len(c.next_tokens) > 1 for c in b) for b in replica_batches]
        singles = [len(b) - n for b, n in zip(replica_batches, chunks)]
        if max(chunks) != 1 or not any(singles):
            return None
        return self._bucket_batch(max(singles) + 1)

    def _check_pages(self, ctx: TextContext, replica: int, seen: set[str]) -> None:
        """A context may step only once per batch, on its replica, within the pages it holds."""
        rid, kv = ctx.request_id, self.kv_manager
        if rid in seen:
            raise ValueError(f"request {rid!r} appears twice in one batch.")
        seen.add(rid)
        if not kv.contains(rid):
            raise ValueError(f"request {rid!r} holds no KV pages: claim them before preparing its inputs, e.g. "
                             f"model.kv_manager.claim({rid!r}, total_tokens=ctx.max_length).")
        if kv.replica_of(rid) != replica:
            raise ValueError(f"request {rid!r} holds pages on replica {kv.replica_of(rid)}, not {replica}.")
        need, held = ctx.cache_length + len(ctx.next_tokens), kv.num_pages_of(rid) * self.kv_params.page_size
        if need > held:
            raise ValueError(f"request {rid!r} holds KV pages for {held} tokens but this step writes up to token "
                             f"{need}: reserve them first (model.kv_manager.reserve({rid!r}, {need})).")

    def _place(self, host: dict[str, np.ndarray]) -> ModelInputs:
        """Host int32 arrays -> ModelInputs on the mesh: one transfer of one packed buffer,
        unpacked on device (one transfer per array costs ~30x more host time)."""
        self._check_runnable()
        layout = tuple((k, v.shape) for k, v in host.items())
        flat = np.concatenate([v.ravel() for v in host.values()])
        packed = place_replicated(flat, self._replicated)
        a = self.unpack_executable(layout, packed)(packed)
        return ModelInputs(
            tokens=a["tokens"], positions=a["positions"], slots=a["slots"], logit_indices=a["logit_indices"],
            input_lengths=a["input_lengths"],
            kv_cache_inputs=KVCacheInputs(page_table=a["page_table"], cache_lengths=a["cache_lengths"]),
            adapters=a.get("adapters"),
        )

    def unpack_executable(self, layout: tuple, packed):
        return self.session.compile("unpack_inputs", partial(unpack, layout), (packed,), key=layout,
                                    out_shardings={name: self._by_row for name, _ in layout})

    def bucket_layout(self, rows: int, tokens: int, width: int, mixed: bool = False) -> tuple:
        """The step inputs' (name, shape) for a bucket (rows per replica), in `_place`'s order.
        Mixed: rows - 1 one-token rows and a chunk of `tokens` per replica, laid flat."""
        flat = (self.replicas, rows - 1 + tokens) if mixed else (rows * self.replicas, tokens)
        rows *= self.replicas
        n_logits = tokens if self.return_logits == ReturnLogits.ALL else 1
        lora = (("adapters", (rows,)),) if self._lora_manager is not None else ()
        return (("tokens", flat), ("positions", flat), ("slots", flat),
                ("logit_indices", (rows, n_logits)), ("input_lengths", (rows,)), ("page_table", (rows, width)),
                ("cache_lengths", (rows,))) + lora

    def zero_inputs(self, rows: int, tokens: int, width: int, mixed: bool = False) -> ModelInputs:
        """Inputs of one bucket (rows per replica) that touch only the null page (for warm-up)."""
        layout = self.bucket_layout(rows, tokens, width, mixed)
        inputs = self._place({name: np.zeros(shape, np.int32) for name, shape in layout})
        padding = (None,) * (rows * self.replicas)
        return inputs.replace(logit_counts=(0,) * len(padding), row_ids=padding, written_end=(0,) * len(padding),
                              capacity=(0,) * len(padding))

    def compile_bucket(self, rows: int, tokens: int, width: int, max_num_steps: int,
                       per_rows: bool = True, mixed: bool = False) -> BucketShapes:
        """Compile (not run) this bucket's model executables from abstract inputs: the input
        unpacker, the step, the log-probabilities (those shared by every bucket of these rows
        only with `per_rows`) and, for decode buckets, the decode loop and prepare_next.
        Returns the step's abstract next-token logits, for the samplers."""
        layout = self.bucket_layout(rows, tokens, width, mixed)
        i32 = np.dtype(np.int32)
        packed = jax.ShapeDtypeStruct((sum(int(np.prod(shape)) for _, shape in layout),), i32,
                                      sharding=self._replicated)
        self.unpack_executable(layout, packed)
        arrays = {name: jax.ShapeDtypeStruct(shape, i32, sharding=self._by_row) for name, shape in layout}
        step = self._step_executable(arrays)
        out_shardings = step.output_shardings[0]
        total = rows * self.replicas
        f32 = np.dtype(np.float32)
        logits = jax.ShapeDtypeStruct((total, self.vocab_size), f32, sharding=out_shardings["next_token_logits"])
        sampled = jax.ShapeDtypeStruct((total,), i32, sharding=self._replicated)  # what the samplers return
        extra = (self.sampling_abstract(total),) if self.logprobs_mode.startswith("processed") else ()
        for top_n in self._logprob_buckets():
            if per_rows:
                self._logprobs_executable("logprobs", logprobs.next_token, top_n, (logits, sampled, *extra))
            if tokens > 1 and self.return_logits == ReturnLogits.ALL:
                all_logits = jax.ShapeDtypeStruct((total, tokens, self.vocab_size), f32,
                                                  sharding=out_shardings["logits"])
                args = (all_logits, arrays["tokens"], arrays["logit_indices"], sampled, *extra)
                self._logprobs_executable("echo_logprobs", logprobs.echo, top_n, args)
        if tokens == 1:
            rep = lambda shape: jax.ShapeDtypeStruct(shape, i32)  # noqa: E731  (host arrays go straight in)
            if max_num_steps > 1:
                self._next_inputs_executable(sampled, arrays)
            self._loop_executable(arrays, self.sampling_abstract(total), rep((total, self.stop_slots)),
                                  rep((total,)), rep(()), max_num_steps)
        return BucketShapes(logits=logits, positions=jax.ShapeDtypeStruct((total,), i32, sharding=self._by_row))

    def prepare_next_token_inputs(self, next_tokens: jax.Array, prev_model_inputs: ModelInputs) -> ModelInputs:
        """The next decode step's inputs, built on device from `next_tokens` [B]; refused when
        a row's next token falls outside the pages in its page table."""
        prev = prev_model_inputs
        self._check_runnable()
        self._check_room(prev, 1)
        arrays = self._next_inputs_executable(next_tokens, prev.arrays())(next_tokens, prev.arrays())
        return ModelInputs(
            tokens=arrays["tokens"], positions=arrays["positions"], slots=arrays["slots"],
            logit_indices=arrays["logit_indices"], input_lengths=arrays["input_lengths"],
            kv_cache_inputs=KVCacheInputs(arrays["page_table"], arrays["cache_lengths"]), adapters=arrays.get("adapters"),
            request_ids=prev.request_ids, logit_counts=tuple(int(r is not None) for r in prev.row_ids),
            row_ids=prev.row_ids, written_end=tuple(e + (r is not None) for r, e in zip(prev.row_ids, prev.written_end)),
            capacity=prev.capacity,
        )

    def _check_room(self, inputs: ModelInputs, steps: int) -> None:
        """`steps` more tokens after `inputs`' own must land in pages each row's table holds."""
        for rid, end, capacity in zip(inputs.row_ids, inputs.written_end, inputs.capacity):
            if rid is not None and end + steps > capacity:
                raise ValueError(f"request {rid!r}: the next step would write token {end + steps} but its page "
                                 f"table holds {capacity}: reserve more pages (kv_manager.reserve) and prepare its "
                                 "inputs again (prepare_initial_token_inputs).")

    def _next_inputs_executable(self, next_tokens, arrays: dict):
        key = (next_tokens.shape, tuple((k, v.shape) for k, v in arrays.items()))
        return self.session.compile("prepare_next", partial(next_inputs, self.kv_params.page_size),
                                    (next_tokens, arrays), key=key,
                                    out_shardings=self._by_row)  # the same shardings as prepare_initial's

    # -- execution ---------------------------------------------------------
    def _step(self, params, kv, arrays):
        cfg = self.config
        tokens, table, index = arrays["tokens"], arrays["page_table"], arrays["logit_indices"]
        adapters = arrays.get("adapters")  # per row; the graph takes them per token
        if tokens.shape[0] != table.shape[0]:  # a mixed step: tokens [R, mixed - 1 + T], rows R x mixed
            r = tokens.shape[0]
            per = table.reshape(r, table.shape[0] // r, -1)
            decode, chunk = per[:, :-1].reshape(-1, per.shape[2]), per[:, -1]
            table = GroupedPageTable((decode, chunk), (1, tokens.shape[1] - per.shape[1] + 1))
            if adapters is not None:
                by_row = adapters.reshape(r, -1)
                adapters = table.join([by_row[:, :-1].reshape(-1, 1),
                                       jnp.repeat(by_row[:, -1:], table.tokens[1], axis=1)], r)
        elif adapters is not None:
            adapters = jnp.broadcast_to(adapters[:, None], tokens.shape)
        extra = {} if adapters is None else {"adapters": adapters}
        if self.pipeline_config.decode_attention != "xla":  # (architectures from outside may not take it)
            extra["attention"] = AttentionRun(self.pipeline_config.decode_attention, self.session.mesh)
        if self.experts is not None:
            extra["experts"] = self.experts
        if self.matmul.kernel != "xla":
            extra["matmul"] = self.matmul
        hidden, kv = self.arch.forward(cfg, params, kv, tokens, arrays["positions"], arrays["slots"], table,
                                       backend=self.session.platform, scan=self.scan_layers, **extra)
        # Row i's logits come from hidden row i (mixed: from its replica's flat tokens).
        picked = jnp.take_along_axis(hidden, index.reshape(hidden.shape[0], -1)[..., None], axis=1)
        picked = picked.reshape(*index.shape, -1)  # [B, N, D]
        head = {"matmul": self.matmul, "backend": self.session.platform} if self._head_table else {}
        logits = self.arch.lm_head(cfg, params, picked, **head).astype(jnp.float32)  # [B, N, V]
        out = {"next_token_logits": logits[:, -1]}
        if self.return_logits != ReturnLogits.LAST_TOKEN:
            out["logits"] = logits
        if self.return_hidden_states == ReturnHiddenStates.LAST:
            out["hidden_states"] = picked[:, -1]
        elif self.return_hidden_states == ReturnHiddenStates.ALL:
            out["hidden_states"] = hidden
        return out, kv

    def step_executable(self, model_inputs: ModelInputs):
        """The compiled step for these inputs' bucket (compiled on first use)."""
        return self._step_executable(model_inputs.arrays())

    def _step_executable(self, arrays: dict):
        # Weights and pool keep one signature for the model's life: key on the step inputs only.
        key = tuple((k, v.shape, str(v.dtype)) for k, v in arrays.items())
        return self.session.compile("step", self._step, (self._weights(), self.kv_manager.pool, arrays),
                                    donate_argnums=(1,), key=key)

    def execute(self, model_inputs: ModelInputs) -> ModelOutputs:
        self._check_runnable()
        exe = self.step_executable(model_inputs)
        out, self.kv_manager.pool = exe(self._weights(), self.kv_manager.pool, model_inputs.arrays())
        counts = np.asarray(model_inputs.logit_counts, np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        return ModelOutputs(
            logits=out.get("logits", out["next_token_logits"]),
            next_token_logits=out["next_token_logits"],
            logit_offsets=offsets,
            hidden_states=out.get("hidden_states"),
        )

    # -- multi-step decode on device --------------------------------------------
    def _decode_loop(self, params, kv, arrays, sampling_inputs, stop_ids, budgets, num_steps, *, max_steps: int):
        """Up to `num_steps` (<= max_steps) decode steps in one `while_loop`: step, sample,
        next inputs. Stops early once every row has sampled a stop id or used its budget.
        Returns tokens [max_steps, B] (-1 where a row had finished or the loop had ended),
        the tokens sampled last [B] (the next step's inputs) and the sampling state after
        them (penalty history, tokens left before min_new_tokens; the next block's input).

        Sampling parameters are data: each step's `cond` on the logits alone runs argmax
        when no row samples or has a logit processor, else the sampler, so one executable
        serves both. (A `cond` around two whole loops made XLA copy the pool into each branch.)"""
        page_size = self.kv_params.page_size
        rows = arrays["tokens"].shape[0]
        full_sampler = jnp.any(sampling_inputs.temperature > 0) | sampling.processing(sampling_inputs)
        sampler = sampling.sampler_for(self.session.mesh)

        def cond(carry):
            i, done = carry[0], carry[1]
            return (i < num_steps) & ~jnp.all(done)

        def body(carry):
            i, done, kv, arrays, out, state = carry
            step_out, kv = self._step(params, kv, arrays)
            logits = step_out["next_token_logits"]
            positions = arrays["cache_lengths"] + arrays["input_lengths"]
            tokens, state = jax.lax.cond(full_sampler, sampler, lambda x, st, _: (sampling.greedy(x), st),
                                         logits, state, positions)
            out = out.at[i].set(jnp.where(done, -1, tokens))
            done = done | jnp.any(tokens[:, None] == stop_ids, axis=1) | (i + 1 >= budgets)
            return i + 1, done, kv, next_inputs(page_size, tokens, arrays), out, state

        init = (jnp.int32(0), arrays["input_lengths"] == 0, kv, arrays, jnp.full((max_steps, rows), -1, jnp.int32),
                sampling_inputs)
        _, _, kv, arrays, out, state = jax.lax.while_loop(cond, body, init)
        return (out, arrays["tokens"][:, 0], state), kv

    def execute_decode_loop(self, model_inputs: ModelInputs, num_steps: int, max_steps: int,
                            sampling_inputs: "sampling.SamplingInputs | None", stop_ids: np.ndarray,
                            budgets: np.ndarray) -> tuple[jax.Array, jax.Array, "sampling.SamplingInputs"]:
        """`num_steps` decode steps in one call, sampling on device: tokens [max_steps, B],
        the last tokens sampled [B] and the sampling state after them, all left on the device.

        stop_ids [B, stop_slots] (-1 padded) and budgets [B] (tokens each row may
        still make) let the loop end as soon as every row has finished. One
        executable per (decode bucket, max_steps); sampling_inputs None: every row greedy.
        """
        self._check_runnable()
        if not 1 <= num_steps <= max_steps:
            raise ValueError(f"num_steps must be in [1, {max_steps}], got {num_steps}.")
        self._check_room(model_inputs, num_steps - 1)  # the loop's first step runs these inputs themselves
        arrays = model_inputs.arrays()
        if sampling_inputs is None:
            sampling_inputs = self.greedy_sampling(arrays["tokens"].shape[0])
        # Small host arrays go straight into the call: cheaper than a device_put each.
        host = (np.asarray(stop_ids, np.int32), np.asarray(budgets, np.int32), np.int32(num_steps))
        exe = self._loop_executable(arrays, sampling_inputs, *host, max_steps)
        out, self.kv_manager.pool = exe(self._weights(), self.kv_manager.pool, arrays, sampling_inputs, *host)
        return out

    def greedy_sampling(self, rows: int) -> "sampling.SamplingInputs":
        """Placed inputs under which every row is plain greedy (kept: its [rows, vocab] history is large)."""
        if rows not in self._greedy_sampling:
            self._greedy_sampling[rows] = self.place_sampling(
                sampling.SamplingInputs.build([], [], rows, vocab=self.vocab_size, stop_slots=self.stop_slots))
        return self._greedy_sampling[rows]

    def place_sampling(self, host: "sampling.SamplingInputs") -> "sampling.SamplingInputs":
        """Replicated, as the decode loop returns its state. A history with no penalised row reuses
        the greedy inputs' zeros, already on the device, instead of sending [rows, vocab] again."""
        zeros = self._greedy_sampling.get(host.history.shape[0])
        if zeros is not None and isinstance(host.history, np.ndarray) and not host.history.any():
            host = host.replace(history=zeros.history)
        return place_replicated(host, self._replicated)

    def sampling_abstract(self, rows: int) -> "sampling.SamplingInputs":
        shapes = sampling.SamplingInputs.abstract(rows, self.vocab_size, self.stop_slots)
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._replicated), shapes)

    def _loop_executable(self, arrays: dict, sampling_inputs, stop_ids, budgets, num_steps, max_steps: int):
        args = (self._weights(), self.kv_manager.pool, arrays, sampling_inputs, stop_ids, budgets, num_steps)
        key = (max_steps, tuple((k, v.shape) for k, v in arrays.items()))
        return self.session.compile("decode_loop", partial(self._decode_loop, max_steps=max_steps), args,
                                    donate_argnums=(1,), key=key,
                                    out_shardings=((self._replicated, self._by_row, self._replicated),
                                                   self.kv_manager.pool_sharding))

    @property
    def sliding_window_everywhere(self) -> int | None:
        """The widest window when every layer slides (then pages behind it are returned), else None."""
        windows = getattr(self.config, "layer_windows", None)
        return max(windows) if windows and min(windows) > 0 else None
