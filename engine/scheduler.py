"""The scheduler interfaces: who may hold resources (capacity), who runs this step (micro-batch).

As in TensorRT-LLM's PyTorch backend, one step's scheduling is two passes::

    active requests (arrival order)
        |  CapacityScheduler.schedule(active, kv_cache_manager)
        v
    fitting (may hold KV this step)  +  paused (preempted: KV released, recomputed later)
        |  MicroBatchScheduler.schedule(fitting, inflight_request_ids)
        v
    context_requests (each with context_chunk_size set)  +  generation_requests

A policy is any class that satisfies one of these ABCs; the executor never asks which one it has.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.request import Request

if TYPE_CHECKING:
    from engine.kv_cache import KVCacheManager


@dataclass
class CapacityOutput:
    fitting_requests: list[Request] = field(default_factory=list)
    paused_requests: list[Request] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    """One step's batch. Context requests come first in the flattened token batch."""

    context_requests: list[Request] = field(default_factory=list)
    generation_requests: list[Request] = field(default_factory=list)
    paused_requests: list[Request] = field(default_factory=list)
    num_fitting_requests: int = 0

    @property
    def scheduled_requests(self) -> list[Request]:
        return self.context_requests + self.generation_requests

    @property
    def batch_size(self) -> int:
        return len(self.context_requests) + len(self.generation_requests)

    @property
    def num_context_tokens(self) -> int:
        return sum(r.context_chunk_size for r in self.context_requests)

    @property
    def num_tokens(self) -> int:
        return self.num_context_tokens + len(self.generation_requests)

    @property
    def context_attention(self) -> float:
        """Causal query-key pairs of the context chunks: each of a chunk's tokens attends to
        the request's computed prefix and to the chunk's tokens up to itself. Read it after
        ``prepare_resources`` (prefix hits counted) and before the counters advance."""
        pairs = 0.0
        for request in self.context_requests:
            chunk = request.context_chunk_size
            pairs += chunk * (request.num_computed_tokens + (chunk + 1) / 2)
        return pairs

    @property
    def decode_kv_tokens(self) -> int:
        """KV entries the generation requests' attention reads (their lengths, new token in)."""
        return sum(r.num_tokens for r in self.generation_requests)

    @property
    def max_decode_kv(self) -> int:
        """The longest generation request's KV length (new token in), 0 without any: a decode
        attention program walks one sequence, so the longest can set the kernel's time."""
        return max((r.num_tokens for r in self.generation_requests), default=0)

    @property
    def is_empty(self) -> bool:
        return not self.context_requests and not self.generation_requests

    @property
    def sampling_requests(self) -> list[Request]:
        """Requests that get a new token this step, in the order of the logits rows: contexts
        whose chunk completes the prompt, then every generation request. Read it before the
        step's counters are advanced."""
        return [r for r in self.context_requests if r.is_last_context_chunk] + list(
            self.generation_requests
        )


class CapacityScheduler(ABC):
    """Decides which active requests may hold KV-cache resources this step.

    Contract:
    - ``active_requests`` holds every unfinished request that has arrived, in arrival order:
      pending ones (``is_pending``: queued or paused, holding no KV) and started ones
      (``is_started``: holding KV).
    - Returns ``fitting`` (in the order they should be batched) and ``paused``; the two are
      disjoint, and ``paused`` holds only started requests. A request in neither simply waits.
    - Fitting requests' KV needs for the next step must fit: ask the manager inside its
      scheduling transaction (``start_scheduling`` / ``get_needed_blocks_one_step`` /
      ``scheduling_has_free_blocks`` / ``scheduling_add_sequence`` /
      ``scheduling_remove_sequence``). The executor then frees the paused requests' KV and the
      resource manager allocates for the scheduled ones; a policy that over-admits makes that
      allocation fail loudly.
    - Must not change requests: the executor applies pauses.
    - ``steady_decode``: declare True if, when every active request is started and decoding,
      none waits, and the free blocks cover every block the next step needs, ``schedule``
      returns all of them and pauses none. The simulated engine then skips scheduling such
      steps (``engine.sim.fast_forward``); False (the default) always schedules.
    """

    max_num_requests: int
    steady_decode: bool = False

    @abstractmethod
    def schedule(
        self, active_requests: Sequence[Request], kv_cache_manager: KVCacheManager
    ) -> CapacityOutput: ...


class MicroBatchScheduler(ABC):
    """Picks the requests that run this step from the fitting ones, within the step budgets.

    Contract:
    - Returns ``(context_requests, generation_requests)``, both sublists of ``fitting_requests``;
      each context request's ``context_chunk_size`` is set to the number of its not-yet-computed
      tokens to compute this step (``1 <= chunk <= num_remaining_context_tokens``).
    - ``len(context) + len(generation) <= max_batch_size``; context chunks plus one token per
      generation request ``<= max_num_tokens`` (when set).
    - Requests whose id is in ``inflight_request_ids`` (still running in another micro-batch)
      are skipped.
    - ``steady_decode``: declare True if decoding requests that were all scheduled in one step
      are all scheduled again, in the same order, in the next (see ``CapacityScheduler``).
    """

    max_batch_size: int
    max_num_tokens: int | None
    steady_decode: bool = False

    @abstractmethod
    def schedule(
        self, fitting_requests: Sequence[Request], inflight_request_ids: set[int]
    ) -> tuple[list[Request], list[Request]]: ...

    def reject_reason(self, request: Request) -> str | None:
        """Why this request can never be scheduled (checked on arrival), or None."""
        return None


class Scheduler:
    """Capacity pass, then micro-batch pass (TensorRT-LLM's SimpleScheduler)."""

    def __init__(
        self, capacity_scheduler: CapacityScheduler, microbatch_scheduler: MicroBatchScheduler
    ):
        self.capacity_scheduler = capacity_scheduler
        self.microbatch_scheduler = microbatch_scheduler
        self._last_context_requests: list[Request] = []

    def schedule_request(
        self,
        active_requests: Sequence[Request],
        kv_cache_manager: KVCacheManager,
        inflight_request_ids: set[int] | None = None,
    ) -> SchedulerOutput:
        # Chunk sizes are per step: clear last step's (only contexts ever carry one).
        for request in self._last_context_requests:
            request.context_chunk_size = 0
        capacity = self.capacity_scheduler.schedule(active_requests, kv_cache_manager)
        context, generation = self.microbatch_scheduler.schedule(
            capacity.fitting_requests, inflight_request_ids or set()
        )
        self._last_context_requests = context
        return SchedulerOutput(
            context_requests=context,
            generation_requests=generation,
            paused_requests=capacity.paused_requests,
            num_fitting_requests=len(capacity.fitting_requests),
        )
