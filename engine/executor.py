"""PyExecutor: the step loop of DESIGN.md, the same for every model engine and policy.

One ``step()``::

    fetch arrivals (reject what can never run)  ->  schedule (capacity, then micro-batch)
      ->  pause the preempted  ->  prepare resources  ->  forward  ->  decode
      ->  advance counters, append tokens, finish  ->  update resources, free the finished
      ->  record one IterationStats row
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Iterable

from engine.clock import Clock, WallClock
from engine.decoder import Decoder
from engine.model_engine import ModelEngine
from engine.request import FinishReason, Request, RequestState
from engine.resource_manager import ResourceManager
from engine.scheduler import Scheduler, SchedulerOutput
from engine.stats import IterationLog, IterationStats

# Steps in a row that schedule nothing while requests hold KV before the executor gives up: a
# policy that keeps doing so would otherwise spin forever.
MAX_IDLE_STEPS = 100


class PyExecutor:
    def __init__(
        self,
        model_engine: ModelEngine,
        decoder: Decoder,
        scheduler: Scheduler,
        resource_manager: ResourceManager,
        clock: Clock | None = None,
        eos_token_id: int | None = None,
    ):
        self.model_engine = model_engine
        self.decoder = decoder
        self.scheduler = scheduler
        self.resource_manager = resource_manager
        self.kv_cache_manager = resource_manager.kv_cache_manager
        self.clock = clock or WallClock()
        self.eos_token_id = eos_token_id
        self.active_requests: list[Request] = []  # arrived, unfinished, in arrival order
        self.finished_requests: list[Request] = []
        self.iteration_stats = IterationLog()  # a list of IterationStats, stored by column
        self._arrivals: list[tuple[float, int, Request]] = []  # heap by arrival time
        self._arrival_order = itertools.count()
        self._num_iterations = 0
        self._num_idle_steps = 0
        # Optional: called after each non-empty step to advance the steps that repeat it
        # (the simulated engine's engine.sim.fast_forward_decodes).
        self.decode_run: Callable[[PyExecutor, SchedulerOutput], int] | None = None

    # ---- requests in ----------------------------------------------------------------------
    def enqueue_requests(self, requests: Iterable[Request]) -> None:
        """Requests enter ``active_requests`` once the clock reaches their ``arrival_time``."""
        for request in requests:
            heapq.heappush(
                self._arrivals, (request.arrival_time, next(self._arrival_order), request)
            )

    @property
    def num_pending_arrivals(self) -> int:
        return len(self._arrivals)

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.active_requests or self._arrivals)

    def reject_reason(self, request: Request) -> str | None:
        """Why ``request`` can never run here, or None. Checked once, on arrival."""
        num_prompt = request.num_prompt_tokens
        if num_prompt == 0:
            return "empty prompt"
        vocab_size = self.model_engine.vocab_size
        prompt = request.prompt_token_ids
        if min(prompt) < 0 or max(prompt) >= vocab_size:  # C-speed scan; find the culprit after
            bad = next(t for t in prompt if not 0 <= t < vocab_size)
            return f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})"
        max_seq_len = self.model_engine.max_seq_len
        if request.max_num_tokens > max_seq_len:
            return (
                f"prompt of {num_prompt} tokens + max_new_tokens "
                f"{request.sampling_params.max_new_tokens} exceeds the model's max length "
                f"{max_seq_len}"
            )
        return self.scheduler.microbatch_scheduler.reject_reason(
            request
        ) or self.resource_manager.reject_reason(request)

    def _fetch_arrivals(self, now: float) -> tuple[int, int]:
        num_new = num_rejected = 0
        while self._arrivals and self._arrivals[0][0] <= now:
            _, _, request = heapq.heappop(self._arrivals)
            reason = self.reject_reason(request)
            if reason is None:
                self.active_requests.append(request)
                num_new += 1
            else:
                request.reject(reason, now)
                self.finished_requests.append(request)
                num_rejected += 1
        return num_new, num_rejected

    # ---- the loop ---------------------------------------------------------------------------
    def run(self, on_step: Callable[[IterationStats], None] | None = None) -> list[Request]:
        """Step until every enqueued request has finished; returns them in finishing order."""
        while self.has_unfinished_requests:
            stats = self.step()
            if on_step is not None and stats is not None:
                on_step(stats)
        return self.finished_requests

    def step(self) -> IterationStats | None:
        """Run one iteration. Returns its stats, or None if there was nothing to do."""
        if not self.active_requests and self._arrivals:
            self.clock.sleep_until(self._arrivals[0][0])
        start = self.clock.now()
        wall_start = time.perf_counter()
        num_new, num_rejected = self._fetch_arrivals(start)
        if not self.active_requests:
            return None
        num_active = len(self.active_requests)

        batch = self.scheduler.schedule_request(self.active_requests, self.kv_cache_manager)
        scheduling_time = time.perf_counter() - wall_start
        for request in batch.paused_requests:
            self.resource_manager.free_resources(request)
            request.pause()

        forward_start = time.perf_counter()
        finished: list[Request] = []
        work = (0.0, 0, 0)  # the row's (context_attention, decode_kv_tokens, max_decode_kv)
        enqueue_time = 0.0
        if batch.is_empty:
            finished = self._resolve_stall(start)
        else:
            self._num_idle_steps = 0
            for request in batch.context_requests:
                if request.is_pending:
                    request.start(start)
            self.resource_manager.prepare_resources(batch)
            sampling_requests = batch.sampling_requests  # after prefix hits moved the counters
            logits = self.model_engine.forward(batch, self.kv_cache_manager)
            # On a GPU, forward returns once its kernels are queued; the decoder then waits for
            # them. A step whose forward_time is close to this is bound by the host.
            enqueue_time = time.perf_counter() - forward_start
            work = self.model_engine.step_work(batch)
            new_tokens = self.decoder.decode(sampling_requests, logits)
            now = self.clock.now()
            for request in batch.context_requests:
                request.num_computed_tokens += request.context_chunk_size
            for request in batch.generation_requests:
                request.num_computed_tokens += 1
            for request, token_id in zip(sampling_requests, new_tokens, strict=True):
                request.append_token(token_id, now)
                reason = self._finish_reason(request, token_id)
                if reason is not None:
                    request.finish(reason, now)
                    finished.append(request)
            self.resource_manager.update_resources(batch)
        forward_time = time.perf_counter() - forward_start

        for request in finished:
            self.resource_manager.free_resources(request)
            self.decoder.release(request)
        if finished:
            done = set(finished)
            self.active_requests = [r for r in self.active_requests if r not in done]
            self.finished_requests.extend(finished)
        stats = self._record(
            batch,
            start,
            scheduling_time,
            forward_time,
            num_new,
            num_rejected,
            num_active,
            len(finished),
            work,
            enqueue_time,
        )
        self.clock.tick()
        if self.decode_run is not None and not batch.is_empty:
            self.decode_run(self, batch)
        return stats

    def _finish_reason(self, request: Request, token_id: int) -> FinishReason | None:
        params = request.sampling_params
        if token_id in params.stop_token_ids or (
            not params.ignore_eos and token_id == self.eos_token_id
        ):
            return FinishReason.STOP
        if request.num_output_tokens >= params.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def _resolve_stall(self, now: float) -> list[Request]:
        """Nothing was scheduled. If nothing holds KV either, no step will ever change that, so
        reject the head pending request rather than loop forever (a policy that admits nothing
        into an idle engine, or a request no policy can place). Otherwise wait: started requests
        or later arrivals will change the state."""
        if any(r.is_started for r in self.active_requests):
            self._num_idle_steps += 1
            if self._num_idle_steps > MAX_IDLE_STEPS:
                raise RuntimeError(
                    f"scheduler stalled: {self._num_idle_steps} steps in a row scheduled nothing "
                    f"while requests hold KV ({type(self.scheduler.capacity_scheduler).__name__}, "
                    f"{type(self.scheduler.microbatch_scheduler).__name__}); active: "
                    f"{self.active_requests[:8]}"
                )
            return []
        head = self.active_requests[0]
        head.reject(
            "never scheduled: the scheduler admitted nothing while no request held KV cache "
            f"({self.kv_cache_manager.num_free_blocks} free blocks)",
            now,
        )
        return [head]

    def _record(
        self,
        batch: SchedulerOutput,
        start: float,
        scheduling_time: float,
        forward_time: float,
        num_new: int,
        num_rejected: int,
        num_active: int,
        num_completed: int,
        work: tuple[float, int, int],
        enqueue_time: float,
    ) -> IterationStats:
        kv = self.kv_cache_manager.get_kv_cache_stats()
        num_pending = num_paused = 0
        for request in self.active_requests:
            if request.is_pending:
                num_pending += 1
                num_paused += request.state is RequestState.PAUSED
        stats = IterationStats(
            iteration=self._num_iterations,
            time=start,
            # On the executor's clock: wall time for real engines, the predicted step time for
            # the simulated one (whose host time is in scheduling_time / forward_time).
            step_latency=self.clock.now() - start,
            scheduling_time=scheduling_time,
            forward_time=forward_time,
            num_new_requests=num_new,
            num_rejected_requests=num_rejected,
            num_context_requests=len(batch.context_requests),
            num_context_tokens=batch.num_context_tokens,
            num_generation_requests=len(batch.generation_requests),
            num_paused_requests=len(batch.paused_requests),
            num_queued_requests=num_pending,
            num_active_requests=num_active,
            num_completed_requests=num_completed,
            kv_max_blocks=kv.max_num_blocks,
            kv_used_blocks=kv.used_num_blocks,
            kv_free_blocks=kv.free_num_blocks,
            kv_cache_hit_rate=kv.cache_hit_rate,
            num_running_requests=len(self.active_requests) - num_pending,
            num_waiting_paused_requests=num_paused,
            input_prep_time=0.0 if batch.is_empty else self.model_engine.last_input_prep_time,
            context_attention=work[0],
            decode_kv_tokens=work[1],
            max_decode_kv=work[2],
            forward_enqueue_time=enqueue_time,
        )
        self._num_iterations += 1
        self.iteration_stats.append(stats)
        return stats
