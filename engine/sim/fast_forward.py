"""Runs of identical decode steps, advanced in one go (the simulated engine's speed-up).

At light load most simulated steps are the same few requests decoding, with nothing arriving,
finishing or waiting: the executor would schedule the same batch again and again, paying ~70 µs
of Python a step for a decision it already knows. ``fast_forward_decodes`` runs after such a step
and replays the following steps without scheduling them, as long as every policy has declared
that it repeats itself then (``steady_decode = True``: a decode-only batch holding every active
request is scheduled again, unchanged, while no request arrives, finishes or waits and the free
KV blocks cover the new ones). The result is exactly what stepping would give (tested): same
token times, same iteration rows (host-time columns aside), same KV blocks::

    step j of the run:  starts at t_j < next arrival;  no request finishes (the last token
                        of the soonest one is left to a normal step);  the KV manager is
                        called only on "event" steps, where some request's new token starts
                        a block (allocation) or fills one (prefix-cache registration)

With lagged admission (overlap scheduling emulated, ``engine.executor``) step j admits the
arrivals up to t_(j-1), so the run goes on while t_(j-1) < next arrival.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.sim.cost_model import StepFeatures
from engine.sim.engine import PLACEHOLDER_TOKEN

if TYPE_CHECKING:
    from engine.executor import PyExecutor
    from engine.kv_cache import KVCacheStats
    from engine.scheduler import SchedulerOutput


def is_steady(executor: PyExecutor) -> bool:
    """Every policy of the executor declares ``steady_decode``."""
    scheduler = executor.scheduler
    return all(
        getattr(part, "steady_decode", False)
        for part in (
            scheduler.capacity_scheduler,
            scheduler.microbatch_scheduler,
            executor.kv_cache_manager,
        )
    )


def block_events(
    num_computed: list[int], num_steps: int, tokens_per_block: int
) -> tuple[list[int], bytearray]:
    """The KV manager's events over ``num_steps`` decode steps of requests whose
    ``num_computed_tokens`` are ``num_computed`` at the first: per step, how many blocks it
    allocates (a request's input token, at position num_computed + i, starts a block) and
    whether it fills one (the step computes a block's last token: prefix-cache registration).
    Every other step leaves the KV manager as it was."""
    tpb = tokens_per_block
    new_blocks = [0] * num_steps
    fills = bytearray(num_steps)
    for base in num_computed:
        for i in range(-base % tpb, num_steps, tpb):
            new_blocks[i] += 1
        for i in range((-base - 1) % tpb, num_steps, tpb):
            fills[i] = 1
    return new_blocks, fills


class RunRows:
    """The iteration rows of a run of repeated decode steps, buffered and written to the log
    in one go (``IterationLog.append_run``). Rows differ only in their times and KV counts;
    the KV manager's stats they show are the ones given to ``flush``, so flush before each
    event changes them. Host-time columns are 0: no host time was spent on these steps."""

    def __init__(self, executor: PyExecutor, num_seqs: int, num_padded_tokens: int):
        self.executor = executor
        self.num_seqs = num_seqs
        self.num_padded_tokens = num_padded_tokens
        self.iterations: list[int] = []
        self.times: list[float] = []
        self.latencies: list[float] = []
        self.kv_tokens: list[int] = []
        self.max_kv: list[int] = []

    def add(self, start: float, latency: float, kv_tokens: int, max_kv: int) -> None:
        self.iterations.append(self.executor._num_iterations)
        self.executor._num_iterations += 1
        self.times.append(start)
        self.latencies.append(latency)
        self.kv_tokens.append(kv_tokens)
        self.max_kv.append(max_kv)

    def flush(self, stats: KVCacheStats) -> None:
        if not self.times:
            return
        num_seqs = self.num_seqs
        self.executor.iteration_stats.append_run(
            len(self.times),
            {
                "iteration": self.iterations,
                "time": self.times,
                "step_latency": self.latencies,
                "decode_kv_tokens": self.kv_tokens,
                "max_decode_kv": self.max_kv,
            },
            {
                "scheduling_time": 0.0,
                "forward_time": 0.0,
                "num_new_requests": 0,
                "num_rejected_requests": 0,
                "num_context_requests": 0,
                "num_context_tokens": 0,
                "num_generation_requests": num_seqs,
                "num_paused_requests": 0,
                "num_queued_requests": 0,
                "num_active_requests": num_seqs,
                "num_completed_requests": 0,
                "kv_max_blocks": stats.max_num_blocks,
                "kv_used_blocks": stats.used_num_blocks,
                "kv_free_blocks": stats.free_num_blocks,
                "kv_cache_hit_rate": stats.cache_hit_rate,
                "num_running_requests": num_seqs,
                "num_waiting_paused_requests": 0,
                "input_prep_time": 0.0,
                "context_attention": 0.0,
                "num_padded_tokens": self.num_padded_tokens,
                "forward_enqueue_time": 0.0,
                "host_time": 0.0,
                "device_time": float("nan"),
            },
        )
        self.iterations = []
        self.times = []
        self.latencies = []
        self.kv_tokens = []
        self.max_kv = []


def fast_forward_decodes(executor: PyExecutor, batch: SchedulerOutput) -> int:
    """After a normal step of ``batch``, advance the steps that would repeat it; returns how
    many. Call only when ``is_steady(executor)`` and the engine is a ``SimModelEngine``, in the
    plain loop (the overlap loop's is ``fast_forward_overlap``)."""
    if executor.overlap:
        raise ValueError("fast_forward_decodes runs the plain loop; use fast_forward_overlap")
    requests = batch.generation_requests
    if (
        batch.context_requests
        or batch.paused_requests
        or not requests
        or len(requests) != len(executor.active_requests)
    ):
        return 0
    # The soonest finish runs as a normal step (finishing, freeing).
    max_steps = min(r.sampling_params.max_new_tokens - r.num_output_tokens for r in requests) - 1
    if max_steps <= 0:
        return 0
    clock = executor.clock
    next_arrival = executor._arrivals[0][0] if executor._arrivals else float("inf")
    kv = executor.kv_cache_manager
    # A decode's input token is its last: num_computed_tokens = num_tokens - 1.
    new_blocks, fills = block_events(
        [r.num_tokens - 1 for r in requests], max_steps, kv.tokens_per_block
    )
    num_free = kv.num_free_blocks

    num_seqs = len(requests)
    kv_tokens = sum(r.num_tokens for r in requests)
    max_kv = max(r.num_tokens for r in requests)  # each request grows by one token a step
    engine = executor.model_engine
    predict = engine.predict  # the cost model's, on the host's timeline if it has one
    num_padded = engine.padding.padded(num_seqs, is_decode_only=True)
    pending_times: list[float] = []  # token times not yet applied to the requests
    # Rows since the KV stats last changed, written to the log in one go.
    rows = RunRows(executor, num_seqs, num_padded)
    stats = kv.get_kv_cache_stats()

    def apply_tokens() -> None:
        if not pending_times:
            return
        count = len(pending_times)
        tokens = [PLACEHOLDER_TOKEN] * count
        for request in requests:
            request.output_token_ids += tokens
            request.token_times += pending_times
            request.num_computed_tokens += count
        pending_times.clear()

    # A step admits the arrivals up to its own start; with lagged admission (overlap emulated),
    # up to the start of the step before it.
    lagged = executor.lagged_admission
    last_start = executor._last_step_start  # the normal step's, which ran just before
    done = 0
    while done < max_steps:
        start = clock.now()
        if (last_start if lagged else start) >= next_arrival:
            break
        if new_blocks[done] > num_free:  # the capacity policy might preempt: step normally
            break
        event = new_blocks[done] or fills[done]
        if event:
            apply_tokens()
            executor.resource_manager.prepare_resources(batch)
            num_free -= new_blocks[done]
        seconds = predict(
            StepFeatures(
                num_decode_seqs=num_seqs,
                decode_kv_tokens=kv_tokens,
                max_decode_kv=max_kv,
                num_padded_tokens=num_padded,
            )
        )
        if not seconds > 0:
            raise ValueError(f"the cost model predicted {seconds} s for a decode step")
        clock.advance(seconds)
        now = clock.now()
        pending_times.append(now)
        if event:
            apply_tokens()
            executor.resource_manager.update_resources(batch)
            rows.flush(stats)  # the rows before this one saw the stats before this step
            stats = kv.get_kv_cache_stats()
        rows.add(start, now - start, kv_tokens, max_kv)
        kv_tokens += num_seqs
        max_kv += 1
        clock.tick()
        done += 1
        last_start = start
    executor._last_step_start = last_start
    apply_tokens()
    rows.flush(stats)
    return done
