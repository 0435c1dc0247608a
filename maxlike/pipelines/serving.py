"""The serving contract: what TextGenerationPipeline and the Scheduler call on a model.

The seed's `PipelineModel` is enough to run a batch by hand (prepare, execute,
sample, prepare next). Serving also needs to know the bucket set (to warm it
and to keep steady state free of compiles), the KV page manager (to admit,
grow and preempt sequences), and a multi-step decode loop on device. A model
class that implements `ServingModel` can be dropped in through the registry;
the pipeline and the scheduler use nothing else.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import jax
import numpy as np

from maxlike.interfaces import MAX_LOGPROBS
from maxlike.pipelines.context import TextContext
from maxlike.pipelines.model import ModelInputs, PipelineModel

if TYPE_CHECKING:
    from maxlike.kv_cache import PagedKVCacheManager
    from maxlike.pipelines.sampling import SamplingInputs

# Top-n log-probability buckets: a request's n is served by the smallest bucket that holds it, so
# every value compiles one of these few executables (up to MAX_LOGPROBS, OpenAI's limit).
LOGPROB_BUCKETS = (5, MAX_LOGPROBS)


def logprob_bucket(top_n: int, vocab_size: int) -> int:
    """The executable's top-n for a request's `top_n` (1..MAX_LOGPROBS), capped at the vocabulary."""
    return min(next(b for b in LOGPROB_BUCKETS if top_n <= b), vocab_size)


class Bucket(NamedTuple):
    """One step shape of the bucket set: rows per replica, tokens per row, page-table width.
    A mixed bucket (in-flight batching) is rows - 1 one-token rows and one prompt chunk of
    `tokens` per replica, in one step."""

    rows: int
    tokens: int
    width: int
    mixed: bool = False


@dataclass(frozen=True)
class BucketShapes:
    """Abstract outputs of one compiled bucket, from which the samplers are compiled."""

    logits: jax.ShapeDtypeStruct  # next-token logits [rows on every replica, vocab]
    positions: jax.ShapeDtypeStruct  # [rows]: the position each row's next token takes


class ServingModel(PipelineModel[TextContext]):
    """A PipelineModel the pipeline and scheduler can serve with.

    Attributes every implementation sets in its constructor:
      replicas        data-parallel replicas; a step's rows are grouped replica by replica
      max_batch_size  rows per replica
      max_length      the most tokens (prompt + generated) one sequence may reach
      stop_slots      stop ids per row the on-device decode loop checks (more are checked on the host)
      compile_only    built from abstract weights: compiles, never runs
      kv_manager      the paged KV pool and who holds which pages
    """

    replicas: int
    max_batch_size: int
    max_length: int
    stop_slots: int
    compile_only: bool
    kv_manager: "PagedKVCacheManager"

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Logits per row (token ids run over [0, vocab_size))."""

    @abstractmethod
    def step_buckets(self) -> list[Bucket]:
        """Every step shape a step is compiled for."""

    @abstractmethod
    def prefill_fits(self, rows: int, max_tokens: int) -> bool:
        """Whether a prefill step of `rows` rows per replica, the longest `max_tokens`, is in the bucket set."""

    @abstractmethod
    def zero_inputs(self, rows: int, tokens: int, width: int, mixed: bool = False) -> ModelInputs:
        """Inputs of one bucket that touch only the null page (for warm-up runs)."""

    @abstractmethod
    def compile_bucket(self, rows: int, tokens: int, width: int, max_num_steps: int,
                       per_rows: bool = True, mixed: bool = False) -> BucketShapes:
        """Compile, without running, every model executable of one bucket (its step, input
        unpacker, log-probabilities and, for decode buckets, the decode loop); those shared by
        every bucket of the same rows (next-token log-probabilities) only with `per_rows`."""

    @abstractmethod
    def executable_counts(self, max_num_steps: int) -> dict[str, int]:
        """How many executables of each kind (by compile name, log-prob sizes together) a full
        warm-up makes: known before compiling anything (`warm-cache --dry-run`)."""

    @abstractmethod
    def execute_decode_loop(self, model_inputs: ModelInputs, num_steps: int, max_steps: int,
                            sampling_inputs: "SamplingInputs | None", stop_ids: np.ndarray,
                            budgets: np.ndarray) -> tuple[jax.Array, jax.Array, "SamplingInputs"]:
        """Up to `num_steps` decode steps in one call, sampling on device: (tokens [max_steps, B],
        -1 where a row had finished; the last tokens sampled [B]; the sampling state after them),
        all left on the device. stop_ids [B, stop_slots] (-1 padded); budgets [B] tokens each row
        may still make."""

    @abstractmethod
    def place_sampling(self, host: "SamplingInputs") -> "SamplingInputs":
        """Host sampling inputs onto the mesh, laid out as the decode loop returns its state."""

    @abstractmethod
    def greedy_sampling(self, rows: int) -> "SamplingInputs":
        """Placed sampling inputs under which every one of `rows` rows is plain greedy."""

    @abstractmethod
    def sampling_abstract(self, rows: int) -> "SamplingInputs":
        """The shapes and shardings of placed sampling inputs (compiling without data)."""

    def record_activation_memory(self) -> None:
        """Called once every bucket has been compiled: keep measured activation sizes (optional)."""
