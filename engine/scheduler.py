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

from engine.request import Request, RequestState

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
    # The previous step's generation requests again, in the same order, each one token further
    # (``Scheduler`` repeated a steady decode step): an engine may advance the previous step's
    # inputs instead of building them again.
    is_repeat: bool = False

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
    """Capacity pass, then micro-batch pass (TensorRT-LLM's SimpleScheduler).

    A steady decode step is not scheduled again: when every policy declares ``steady_decode``
    (the capacity and micro-batch schedulers here, the KV manager at each call), the last batch
    was decode-only and held every active request, all of them still decode, and the free
    blocks cover those this step's tokens start, the policies would return the same batch
    (their contract), so it is returned without asking them. At 256 running requests that
    saves the two passes' per-request Python on most steps. ``num_repeated_steps`` counts them.
    """

    def __init__(
        self, capacity_scheduler: CapacityScheduler, microbatch_scheduler: MicroBatchScheduler
    ):
        self.capacity_scheduler = capacity_scheduler
        self.microbatch_scheduler = microbatch_scheduler
        self.is_steady = capacity_scheduler.steady_decode and microbatch_scheduler.steady_decode
        self.num_repeated_steps = 0
        self._last_output: SchedulerOutput | None = None

    def schedule_request(
        self,
        active_requests: Sequence[Request],
        kv_cache_manager: KVCacheManager,
        inflight_request_ids: set[int] | None = None,
    ) -> SchedulerOutput:
        repeated = self._repeat_steady_decode(
            active_requests, kv_cache_manager, inflight_request_ids
        )
        if repeated is not None:
            self.num_repeated_steps += 1
            return repeated
        last = self._last_output
        # Chunk sizes are per step: clear last step's (only contexts ever carry one).
        for request in last.context_requests if last is not None else ():
            request.context_chunk_size = 0
        capacity = self.capacity_scheduler.schedule(active_requests, kv_cache_manager)
        context, generation = self.microbatch_scheduler.schedule(
            capacity.fitting_requests, inflight_request_ids or set()
        )
        self._last_output = SchedulerOutput(
            context_requests=context,
            generation_requests=generation,
            paused_requests=capacity.paused_requests,
            num_fitting_requests=len(capacity.fitting_requests),
        )
        return self._last_output

    def _repeat_steady_decode(
        self,
        active_requests: Sequence[Request],
        kv_cache_manager: KVCacheManager,
        inflight_request_ids: set[int] | None,
    ) -> SchedulerOutput | None:
        """The last batch again if the policies would return it (see the class), else None."""
        last = self._last_output
        if (
            last is None
            or not self.is_steady
            or not getattr(kv_cache_manager, "steady_decode", False)
            or inflight_request_ids
            or last.context_requests
            or last.paused_requests
            or not last.generation_requests
            or len(last.generation_requests) != len(active_requests)
        ):
            return None
        # The same number as the active requests, all still decoding: the same requests (a
        # finished or paused one no longer decodes, a new one does not yet).
        decoding = RequestState.GENERATION
        computed = [r.num_computed_tokens for r in last.generation_requests if r.state is decoding]
        if len(computed) != len(active_requests):
            return None
        # A request's next token, at position num_computed_tokens, may start a block.
        tokens_per_block = kv_cache_manager.tokens_per_block
        num_new_blocks = [c % tokens_per_block for c in computed].count(0)
        if num_new_blocks > kv_cache_manager.num_free_blocks:
            return None
        generation = list(last.generation_requests)
        return SchedulerOutput(
            generation_requests=generation, num_fitting_requests=len(generation), is_repeat=True
        )
