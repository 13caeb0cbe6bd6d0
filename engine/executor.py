"""PyExecutor: the step loop of DESIGN.md, the same for every model engine and policy.

One ``step()``::

    fetch arrivals (reject what can never run)  ->  schedule (capacity, then micro-batch)
      ->  pause the preempted  ->  prepare resources  ->  forward  ->  decode
      ->  advance counters, append tokens, finish  ->  update resources, free the finished
      ->  record one IterationStats row

Overlap scheduling (``overlap=True``; TensorRT-LLM's overlap scheduler, vLLM's async
scheduling): the host schedules and prepares step n+1 while the device still runs step n, and
reads step n's tokens only after step n+1 is queued::

    host    | schedule n+1 | prepare n+1 | launch n+1 | read n, finish n | schedule n+2 | ...
    device  | ......... step n ......... | ............. step n+1 ............. |

Step n+1 is scheduled from counts alone: each request sampled in step n holds a pending token
(``Request.append_pending_token``) that the model engine replaces on the device with step n's
sampled id (``fill_pending_tokens``). A request that reaches ``max_new_tokens`` in step n
finishes at its launch (it is known); one that samples a stop token in step n is seen only after
step n+1 was queued with it, and that one extra token is dropped. ``step()`` then returns the
row of the step it read back (n), one step behind the one it launched.

Lagged admission (``lagged_admission=True``, the simulated engine's stand-in for overlap when it
fast-forwards): the plain loop, but as overlap scheduling sees the world. Step n+1 admits only
the requests that arrived by the start of step n (overlap schedules it then) and stamps them
scheduled at that time, and the KV manager's ``update_resources`` for step n runs after step
n+1's ``prepare_resources`` and frees (overlap reads step n back only then). With no stop
tokens (the simulator's outputs are placeholders), every request's times equal those of the
overlap loop on the simulated engine's virtual device (tested); host time is not modeled
either way.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from engine.clock import Clock, WallClock
from engine.decoder import Decoder
from engine.model_engine import ModelEngine
from engine.request import FinishReason, Request, RequestState
from engine.resource_manager import ResourceManager
from engine.scheduler import Scheduler, SchedulerOutput
from engine.stats import IterationLog, IterationStats, StepWork


@dataclass
class InFlightStep:
    """A step queued on the device whose sampled tokens the host has not read yet (overlap)."""

    batch: SchedulerOutput
    rows: list[tuple[Request, int]]  # per sampled row: (request, index of its pending token)
    tokens: torch.Tensor  # [len(rows)] int64, on the device
    host_tokens: torch.Tensor  # the same, copied to (pinned) host memory once `copied` passes
    copied: torch.cuda.Event | None  # None on CPU
    began: torch.cuda.Event | None  # recorded before the forward (CUDA): device_time
    start: float  # clock time at scheduling
    forward_start: float  # perf_counter at the forward's start
    scheduling_time: float
    input_prep_time: float
    enqueue_time: float
    num_new: int
    num_rejected: int
    num_active: int
    work: StepWork
    # Read at launch: the batch's chunk sizes change when the next step is scheduled.
    num_context_tokens: int
    length_finished: list[Request] = field(default_factory=list)  # finished at launch, in order
    void: set[Request] = field(default_factory=set)  # stopped before: their row is dropped
    host_time: float = 0.0  # the launching iteration's, the wait left out (set at its end)

    def read_tokens(self) -> tuple[list[int], float]:
        """Wait for this step's tokens only (not for steps queued after it); returns them and
        the seconds waited."""
        waited_from = time.perf_counter()
        if self.copied is not None:
            self.copied.synchronize()
        values = self.host_tokens.tolist()  # the simulated engine's waits here
        return values, time.perf_counter() - waited_from

    @property
    def device_time(self) -> float:
        return device_seconds(self.began, self.copied)


def device_seconds(began: torch.cuda.Event | None, ended: torch.cuda.Event | None) -> float:
    """Seconds between two passed timing events; NaN without them (off CUDA)."""
    if began is None or ended is None:
        return float("nan")
    return began.elapsed_time(ended) / 1e3


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
        overlap: bool = False,
        lagged_admission: bool = False,
    ):
        if overlap and lagged_admission:
            raise ValueError("overlap and lagged_admission exclude each other")
        if overlap and not model_engine.supports_overlap:
            raise ValueError(
                f"overlap scheduling needs a model engine that reads pending tokens on the "
                f"device; {type(model_engine).__name__} does not"
            )
        self.overlap = overlap
        self.lagged_admission = lagged_admission
        self._last_step_start: float | None = None  # lagged: the last step's start, if it ran
        self._unread_batch: SchedulerOutput | None = None  # lagged: its update_resources is due
        self._in_flight: InFlightStep | None = None
        self._last_resolved = float("-inf")  # clock time the last in-flight step was read
        self.model_engine = model_engine
        self.decoder = decoder
        self.scheduler = scheduler
        self.resource_manager = resource_manager
        self.kv_cache_manager = resource_manager.kv_cache_manager
        self.clock = clock or WallClock()
        device = getattr(model_engine, "device", None)
        # CUDA events time each step on the device (IterationStats.device_time).
        self._times_device = isinstance(device, torch.device) and device.type == "cuda"
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
        return bool(self.active_requests or self._arrivals or self._in_flight)

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
        """Run one iteration. Returns its stats, or None if there was nothing to do. With
        ``overlap``, launches one step and returns the stats of the one before it."""
        if self.overlap:
            return self._step_overlap()
        start, admitted_at, wall_start, num_new, num_rejected = self._admit_arrivals()
        if not self.active_requests:
            self._read_unread()
            return None
        num_active = len(self.active_requests)
        batch, scheduling_time = self._schedule(wall_start)
        self._last_step_start = None if batch.is_empty else start

        forward_start = time.perf_counter()
        finished: list[Request] = []
        work = StepWork()  # an empty step's
        enqueue_time = waited = 0.0
        began = ended = None
        if batch.is_empty:
            self._read_unread()
            finished = self._resolve_stall(start)
        else:
            self._num_idle_steps = 0
            self._prepare(batch, admitted_at)
            sampling_requests = batch.sampling_requests  # after prefix hits moved the counters
            began = self._device_mark()
            logits = self.model_engine.forward(batch, self.kv_cache_manager)
            # On a GPU, forward returns once its kernels are queued; the decoder then waits for
            # them. A step whose forward_time is close to this is bound by the host.
            enqueue_time = time.perf_counter() - forward_start
            work = self.model_engine.step_work(batch)
            decode_start = time.perf_counter()
            new_tokens = self.decoder.decode(sampling_requests, logits)
            waited = time.perf_counter() - decode_start  # the wait, with sampling's launches
            if began is not None:
                ended = self._device_mark()
                ended.synchronize()
            now = self.clock.now()
            self._advance_counters(batch)
            for request, token_id in zip(sampling_requests, new_tokens, strict=True):
                request.append_token(token_id, now)
                reason = self._finish_reason(request, token_id)
                if reason is not None:
                    request.finish(reason, now)
                    finished.append(request)
            if not self.lagged_admission:
                self.resource_manager.update_resources(batch)
        forward_time = time.perf_counter() - forward_start

        self._retire(finished)
        if self.lagged_admission and not batch.is_empty:
            self._read_unread()
            self._unread_batch = batch
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
            host_time=time.perf_counter() - wall_start - waited,
            device_time=device_seconds(began, ended),
        )
        self.clock.tick()
        if self.decode_run is not None and not batch.is_empty:
            self.decode_run(self, batch)
        return stats

    # ---- overlap scheduling ------------------------------------------------------------------
    def _step_overlap(self) -> IterationStats | None:
        in_flight = self._in_flight
        start, _, wall_start, num_new, num_rejected = self._admit_arrivals()
        if not self.active_requests and in_flight is None:
            return None
        launched: InFlightStep | None = None
        stats = None
        if self.active_requests:
            num_active = len(self.active_requests)
            batch, scheduling_time = self._schedule(wall_start)
            if not batch.is_empty:
                self._num_idle_steps = 0
                launched = self._launch(
                    batch, in_flight, start, scheduling_time, num_new, num_rejected, num_active
                )
            elif in_flight is None:  # nothing runs and nothing will change by itself
                finished = self._resolve_stall(start)
                self._retire(finished)
                stats = self._record(
                    batch, start, scheduling_time, 0.0, num_new, num_rejected, num_active,
                    len(finished), (0.0, 0, 0), 0.0,
                )  # fmt: skip
        waited = 0.0
        if in_flight is not None:
            stats, waited = self._resolve(in_flight, launched)
        if launched is not None:
            launched.host_time = time.perf_counter() - wall_start - waited
        self._in_flight = launched
        self.clock.tick()
        if self.decode_run is not None and launched is not None:
            self.decode_run(self, launched.batch)
        return stats

    def _launch(
        self,
        batch: SchedulerOutput,
        in_flight: InFlightStep | None,
        start: float,
        scheduling_time: float,
        num_new: int,
        num_rejected: int,
        num_active: int,
    ) -> InFlightStep:
        """Queue ``batch`` on the device with the tokens of ``in_flight`` as its pending inputs,
        advance the counters, give each sampled request a pending token, and finish those that
        reach ``max_new_tokens`` (their KV is free for the next step's schedule). The counts
        are for the step's row."""
        self._prepare(batch, start)
        if in_flight is None:  # the device was idle: this step's time runs from its start
            self._last_resolved = start
        sampling_requests = batch.sampling_requests
        forward_start = time.perf_counter()
        pending = in_flight.tokens if in_flight is not None and in_flight.rows else None
        began = self._device_mark()
        logits = self.model_engine.forward(batch, self.kv_cache_manager, pending)
        # Where the model engine wants the tokens (the next step's forward reads them there).
        out = self.model_engine.token_buffer(len(sampling_requests))
        if out is None:
            tokens = self.decoder.sample(sampling_requests, logits)
        else:
            tokens = self.decoder.sample(sampling_requests, logits, out=out)
        copied = None
        host_tokens = tokens
        if tokens.is_cuda:
            # Queued right behind this step's sampling, so reading it waits for this step only.
            host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host_tokens.copy_(tokens, non_blocking=True)
            copied = torch.cuda.Event(enable_timing=True)
            copied.record()
        elif out is not None:  # the next step samples into the same buffer
            host_tokens = tokens.clone()
        enqueue_time = time.perf_counter() - forward_start
        step = InFlightStep(
            batch=batch,
            rows=[],
            tokens=tokens,
            host_tokens=host_tokens,
            copied=copied,
            began=began,
            start=start,
            forward_start=forward_start,
            scheduling_time=scheduling_time,
            input_prep_time=self.model_engine.last_input_prep_time,
            enqueue_time=enqueue_time,
            num_new=num_new,
            num_rejected=num_rejected,
            num_active=num_active,
            work=self.model_engine.step_work(batch),
            num_context_tokens=batch.num_context_tokens,
        )
        self._advance_counters(batch)
        for index, request in enumerate(sampling_requests):
            step.rows.append((request, request.num_output_tokens))
            request.append_pending_token(index)
            if request.num_output_tokens >= request.sampling_params.max_new_tokens:
                request.finish(FinishReason.LENGTH, start)  # its time is set when read
                step.length_finished.append(request)
        # Out of the schedule and its KV free now; in finished_requests once its token is read
        # (a closed-loop workload sends the next request at that time).
        self._release(step.length_finished)
        return step

    def _resolve(
        self, step: InFlightStep, launched: InFlightStep | None
    ) -> tuple[IterationStats, float]:
        """Read ``step``'s tokens, finish the requests that sampled a stop token (dropping the
        token ``launched`` samples for them), and record ``step``'s row. Returns the row and
        the seconds spent waiting for the tokens."""
        values, waited = step.read_tokens()
        now = self.clock.now()
        finished: list[Request] = []  # in row order
        stopped: list[Request] = []  # of those, the ones still scheduled: release them
        length_finished = set(step.length_finished)
        for (request, position), token_id in zip(step.rows, values, strict=True):
            if request in step.void:
                continue
            request.resolve_token(position, token_id, now)
            if self._is_stop(request, token_id):
                del request.output_token_ids[position + 1 :]  # a token sampled after it
                if launched is not None:
                    launched.void.add(request)
                if request.is_finished:  # released by length, at this launch or the next one
                    request.finish_reason = FinishReason.STOP
                    request.finish_time = now
                else:
                    request.finish(FinishReason.STOP, now)
                    stopped.append(request)
                finished.append(request)
            elif request in length_finished:
                request.finish_time = now
                finished.append(request)
        self.resource_manager.update_resources(step.batch)
        self._release(stopped)
        self.finished_requests.extend(finished)
        forward_time = time.perf_counter() - step.forward_start
        stats = self._record(
            step.batch, step.start, step.scheduling_time, forward_time, step.num_new,
            step.num_rejected, step.num_active, len(finished), step.work,
            step.enqueue_time, input_prep_time=step.input_prep_time,
            latency_from=max(step.start, self._last_resolved),
            num_context_tokens=step.num_context_tokens,
            host_time=step.host_time, device_time=step.device_time,
        )  # fmt: skip
        self._last_resolved = self.clock.now()
        return stats, waited

    # ---- the parts both loops share -----------------------------------------------------------
    def _admit_arrivals(self) -> tuple[float, float, float, int, int]:
        """With nothing running or in flight, sleep until the next arrival; then admit what has
        arrived. Returns (clock time, admission time, perf_counter, num_new, num_rejected) at
        the step's start; the admission time is the clock time but with lagged admission."""
        if not self.active_requests and self._arrivals and self._in_flight is None:
            self.clock.sleep_until(self._arrivals[0][0])
        start = self.clock.now()
        wall_start = time.perf_counter()
        admitted_at = start
        if self.lagged_admission and self._last_step_start is not None:
            admitted_at = self._last_step_start
        num_new, num_rejected = self._fetch_arrivals(admitted_at)
        if admitted_at < start and not self.active_requests:
            # Overlap would launch nothing here, read the step in flight, and schedule again
            # at `start`: so does the lagged loop.
            self._read_unread()
            admitted_at = start
            more_new, more_rejected = self._fetch_arrivals(start)
            num_new, num_rejected = num_new + more_new, num_rejected + more_rejected
        return start, admitted_at, wall_start, num_new, num_rejected

    def _read_unread(self) -> None:
        """Lagged admission: the last step's ``update_resources``, due when overlap reads it."""
        if self._unread_batch is not None:
            self.resource_manager.update_resources(self._unread_batch)
            self._unread_batch = None

    def _prepare(self, batch: SchedulerOutput, start: float) -> None:
        """Start the batch's new contexts and give every scheduled request its KV blocks."""
        for request in batch.context_requests:
            if request.is_pending:
                request.start(start)
        self.resource_manager.prepare_resources(batch)

    @staticmethod
    def _advance_counters(batch: SchedulerOutput) -> None:
        """The step computed each context's chunk and each generation's last token."""
        for request in batch.context_requests:
            request.num_computed_tokens += request.context_chunk_size
        for request in batch.generation_requests:
            request.num_computed_tokens += 1

    def _retire(self, finished: list[Request]) -> None:
        """``_release`` finished requests and move them to ``finished_requests``."""
        self._release(finished)
        self.finished_requests.extend(finished)

    def _release(self, finished: list[Request]) -> None:
        """Free finished requests' KV and generators; drop them from ``active_requests``."""
        for request in finished:
            self.resource_manager.free_resources(request)
            self.decoder.release(request)
        if finished:
            done = set(finished)
            self.active_requests = [r for r in self.active_requests if r not in done]

    def _schedule(self, wall_start: float) -> tuple[SchedulerOutput, float]:
        """The step's batch and the host seconds since ``wall_start``; the preempted are paused
        (their KV freed)."""
        batch = self.scheduler.schedule_request(self.active_requests, self.kv_cache_manager)
        scheduling_time = time.perf_counter() - wall_start
        for request in batch.paused_requests:
            self.resource_manager.free_resources(request)
            request.pause()
        return batch, scheduling_time

    def _device_mark(self) -> torch.cuda.Event | None:
        """A timing event recorded on the current CUDA stream, or None off CUDA."""
        if not self._times_device:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _is_stop(self, request: Request, token_id: int) -> bool:
        params = request.sampling_params
        return token_id in params.stop_token_ids or (
            not params.ignore_eos and token_id == self.eos_token_id
        )

    def _finish_reason(self, request: Request, token_id: int) -> FinishReason | None:
        params = request.sampling_params
        if self._is_stop(request, token_id):
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
        work: StepWork,
        enqueue_time: float,
        *,
        input_prep_time: float | None = None,
        latency_from: float | None = None,
        num_context_tokens: int | None = None,
        host_time: float = 0.0,
        device_time: float = float("nan"),
    ) -> IterationStats:
        """One row. ``input_prep_time``: default the model engine's last; ``latency_from``: the
        clock time the step's latency counts from (default ``start``; with overlap, when the
        step before it was read, since the two overlap); ``num_context_tokens``: default the
        batch's (its chunk sizes, valid until the next schedule)."""
        kv = self.kv_cache_manager.get_kv_cache_stats()
        if input_prep_time is None:
            input_prep_time = 0.0 if batch.is_empty else self.model_engine.last_input_prep_time
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
            step_latency=self.clock.now() - (start if latency_from is None else latency_from),
            scheduling_time=scheduling_time,
            forward_time=forward_time,
            num_new_requests=num_new,
            num_rejected_requests=num_rejected,
            num_context_requests=len(batch.context_requests),
            num_context_tokens=(
                batch.num_context_tokens if num_context_tokens is None else num_context_tokens
            ),
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
            input_prep_time=input_prep_time,
            context_attention=work.context_attention,
            decode_kv_tokens=work.decode_kv_tokens,
            max_decode_kv=work.max_decode_kv,
            num_padded_tokens=work.num_padded_tokens,
            forward_enqueue_time=enqueue_time,
            host_time=host_time,
            device_time=device_time,
        )
        self._num_iterations += 1
        self.iteration_stats.append(stats)
        return stats
