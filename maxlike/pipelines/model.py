"""MAX's PipelineModel API: the abstract base and the types it trades in."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from maxlike.kv_cache import KVCacheInputs

if TYPE_CHECKING:
    from maxlike.config import KVCacheConfig, PipelineConfig
    from maxlike.engine import InferenceSession
    from maxlike.interfaces import LogProbabilities
    from maxlike.pipelines.lora import LoRAManager

BaseContextType = TypeVar("BaseContextType")


class ReturnLogits(str, enum.Enum):
    """Which logits `execute` returns besides the next-token ones."""

    LAST_TOKEN = "last_token"
    VARIABLE = "variable"  # the last `return_n_logits` of each row
    ALL = "all"  # every input position


class ReturnHiddenStates(str, enum.Enum):
    """Which hidden states (after the final norm) `execute` returns."""

    NONE = "none"
    LAST = "last"
    ALL = "all"


def upper_bounded_default(upper_bound: int, default: int | None) -> int:
    """`default` if given and within `upper_bound`, else `upper_bound`; above it is an error."""
    if default is not None and default > upper_bound:
        raise ValueError(f"default value provided ({default}) exceeds the upper bound ({upper_bound})")
    return upper_bound if default is None else default


@struct.dataclass
class ModelInputs:
    """One step's inputs: device arrays (a pytree) plus host-side metadata.

    tokens/positions/slots [B, T] (padded to buckets; padding writes to the
    null page); logit_indices [B, N] right-aligned positions whose logits are
    returned; input_lengths [B] real tokens per row.

    Host metadata (never part of the compiled signature): `request_ids` of the
    real rows; per row of the arrays (padding included) its request id or None
    (`row_ids`), how many logits it returns (`logit_counts`), one past the last
    position this step writes (`written_end`) and how many tokens the pages in
    its page table hold (`capacity`): a later step that would write past them
    is refused instead of writing into pages the row does not own.
    """

    tokens: jax.Array
    positions: jax.Array
    slots: jax.Array
    logit_indices: jax.Array
    input_lengths: jax.Array
    kv_cache_inputs: KVCacheInputs
    adapters: jax.Array | None = None  # [B] each row's LoRA slot (0: the base model); with LoRA only
    request_ids: tuple = struct.field(pytree_node=False, default=())
    logit_counts: tuple = struct.field(pytree_node=False, default=())
    row_ids: tuple = struct.field(pytree_node=False, default=())
    written_end: tuple = struct.field(pytree_node=False, default=())
    capacity: tuple = struct.field(pytree_node=False, default=())

    @property
    def batch_size(self) -> int:
        """Real rows (the arrays may be padded beyond them)."""
        return len(self.request_ids)

    def arrays(self) -> dict[str, jax.Array]:
        """Only the arrays: what the compiled step sees (metadata never recompiles)."""
        return {
            "tokens": self.tokens,
            "positions": self.positions,
            "slots": self.slots,
            "logit_indices": self.logit_indices,
            "input_lengths": self.input_lengths,
            "page_table": self.kv_cache_inputs.page_table,
            "cache_lengths": self.kv_cache_inputs.cache_lengths,
            **({} if self.adapters is None else {"adapters": self.adapters}),
        }


@dataclass
class ModelOutputs:
    """What `execute` returns.

    next_token_logits [B, V]. logits: [B, N, V] with row b's valid logits the
    last `logit_offsets[b+1] - logit_offsets[b]` of its N (== next_token_logits
    for ReturnLogits.LAST_TOKEN). hidden_states per ReturnHiddenStates.
    """

    logits: jax.Array
    next_token_logits: jax.Array | None = None
    logit_offsets: np.ndarray | None = None
    hidden_states: jax.Array | None = None


class PipelineModel(ABC, Generic[BaseContextType]):
    """A pipeline model with setup, input preparation and execution methods."""

    def __init__(
        self,
        pipeline_config: "PipelineConfig",
        session: "InferenceSession",
        devices: Sequence[jax.Device],
        kv_cache_config: "KVCacheConfig",
        weights: Any,
        adapter: Any,
        return_logits: ReturnLogits,
        return_hidden_states: ReturnHiddenStates = ReturnHiddenStates.NONE,
    ) -> None:
        self.pipeline_config = pipeline_config
        self.session = session
        self.devices = list(devices)
        self.kv_cache_config = kv_cache_config
        self.weights = weights
        self.adapter = adapter
        self.return_logits = ReturnLogits(return_logits)
        self.return_hidden_states = ReturnHiddenStates(return_hidden_states)
        self._huggingface_config = None
        self._signal_buffers: list[jax.Array] | None = None
        self._lora_manager: "LoRAManager | None" = None  # set by a subclass that serves LoRA adapters

    # -- sizing ----------------------------------------------------------
    @classmethod
    @abstractmethod
    def calculate_max_seq_len(cls, pipeline_config: "PipelineConfig", huggingface_config: Any) -> int:
        """Calculates the optimal max sequence length for the model."""

    @classmethod
    def estimate_weights_size(cls, pipeline_config: "PipelineConfig") -> int:
        """Bytes of the model's weights (0 when a model does not say)."""
        return 0

    @classmethod
    def estimate_activation_memory(cls, pipeline_config: "PipelineConfig", huggingface_config: Any) -> int:
        """Bytes of temporary buffers a step needs (0 when a model does not say)."""
        return 0

    # -- properties ------------------------------------------------------
    @property
    def dtype(self) -> jnp.dtype:
        """The model data type from the pipeline config ("auto" resolved per backend)."""
        from maxlike.pipelines.memory import resolve_dtype

        return resolve_dtype(self.pipeline_config.model.dtype, self.session.platform)

    @property
    def huggingface_config(self) -> Any:
        """The HF config of `pipeline_config.model.model_path` (ValueError if unreadable)."""
        if self._huggingface_config is None:
            from maxlike.weights import load_hf_config

            self._huggingface_config = load_hf_config(self.pipeline_config.model.model_path)
        return self._huggingface_config

    @property
    def lora_manager(self) -> "LoRAManager | None":
        """The LoRA manager if LoRA is enabled, otherwise None."""
        return self._lora_manager

    @property
    def signal_buffers(self) -> list[jax.Array]:
        """One small buffer per device on multi-device meshes, created on first use.

        Empty on a single device and in compile-only mode (nothing is allocated
        for compilation).
        """
        if self._signal_buffers is None:
            if len(self.devices) <= 1 or self.pipeline_config.compile_only:
                self._signal_buffers = []
            else:
                local = [d for d in self.devices if d.process_index == jax.process_index()]  # multi-host: ours only
                self._signal_buffers = [jax.device_put(jnp.zeros((1,), jnp.uint8), d) for d in local]
        return self._signal_buffers

    # -- the step --------------------------------------------------------
    @abstractmethod
    def execute(self, model_inputs: ModelInputs) -> ModelOutputs:
        """Executes the graph with the given inputs."""

    @abstractmethod
    def prepare_initial_token_inputs(
        self, replica_batches: Sequence[Sequence[BaseContextType]], kv_cache_inputs: KVCacheInputs | None = None,
        return_n_logits: int = 1,
    ) -> ModelInputs:
        """Prepares the initial inputs to be passed to execute()."""

    @abstractmethod
    def prepare_next_token_inputs(self, next_tokens: jax.Array, prev_model_inputs: ModelInputs) -> ModelInputs:
        """Prepares the inputs of the next step of a multi-step execution."""

    def compute_log_probabilities(
        self,
        session: "InferenceSession",
        model_inputs: ModelInputs,
        model_outputs: ModelOutputs,
        next_tokens: jax.Array,
        batch_top_n: list[int],
        batch_echo: list[bool],
        sampling_inputs: Any = None,
    ) -> "list[LogProbabilities | None]":
        """Optional: log probabilities of the sampled (and, with echo, input) tokens. maxlike's
        addition: `sampling_inputs`, the sampler's inputs of the step, for `logprobs_mode`
        processed_* (the distribution the tokens were drawn from)."""
        raise NotImplementedError(f"{type(self).__name__} does not compute log probabilities.")
