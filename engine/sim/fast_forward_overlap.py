"""Runs of identical decode steps in the overlap loop, advanced in one go (the host pipeline's
speed-up; ``fast_forward`` is the plain loop's).

The overlap loop (``engine.executor``) launches step n+1 before it reads step n. In a steady run
(every policy declares ``steady_decode``; the same decode-only batch of every active request;
nothing arrives, finishes or waits; the free KV blocks cover the new ones) iteration j does the
same thing every time::

    launch j   prepare_resources  ->  SimModelEngine.queue (the host's time on the clock with
               the pipeline, the step on the virtual device)  ->  counters + 1, a pending token
    read j-1   the clock to step j-1's end  ->  its tokens, resolved at that time
               ->  update_resources  ->  step j-1's row

``fast_forward_overlap`` runs after a normal iteration that launched such a batch and replays
the iterations that follow without scheduling them. The KV manager is called only on the steps
where it has something to do (``fast_forward.block_events``); the requests' tokens and the
rows are written in batches, each time the KV manager is about to read them and at the end.
The run's first read is the normal loop's own (the step in flight has that iteration's row),
and the last step launched stays in flight for the normal loop to read. Request times, rows
(host-time columns aside) and KV blocks are what the overlap loop gives (tested).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from engine.executor import InFlightStep
from engine.request import pending_token_id
from engine.sim.cost_model import StepFeatures
from engine.sim.engine import PLACEHOLDER_TOKEN, SimTokens
from engine.sim.fast_forward import RunRows, block_events
from engine.stats import StepWork

if TYPE_CHECKING:
    from engine.executor import PyExecutor
    from engine.scheduler import SchedulerOutput


def fast_forward_overlap(executor: PyExecutor, batch: SchedulerOutput) -> int:
    """After an iteration of the overlap loop that launched ``batch``, launch and read the
    steps that would repeat it; returns how many it launched. Call only when
    ``fast_forward.is_steady(executor)`` and the engine is a ``SimModelEngine``."""
    if not executor.overlap:
        raise ValueError("fast_forward_overlap runs the overlap loop; use fast_forward_decodes")
    in_flight = executor._in_flight
    requests = batch.generation_requests
    if (
        in_flight is None
        or in_flight.batch is not batch
        or batch.context_requests
        or batch.paused_requests
        or not requests
        or len(requests) != len(executor.active_requests)
        or in_flight.length_finished
    ):
        return 0
    # A request finishes at the launch of its last token: that launch is a normal step's.
    max_launches = min(r.sampling_params.max_new_tokens - r.num_output_tokens for r in requests)
    max_launches -= 1
    if max_launches <= 0:
        return 0
    clock = executor.clock
    next_arrival = executor._arrivals[0][0] if executor._arrivals else float("inf")
    kv = executor.kv_cache_manager
    resources = executor.resource_manager
    engine = executor.model_engine
    new_blocks, fills = block_events(
        [r.num_computed_tokens for r in requests], max_launches, kv.tokens_per_block
    )
    num_free = kv.num_free_blocks
    # Launch i's features (i from 0): each launch, every request holds one token more.
    first = StepFeatures.of(batch, engine.padding)
    num_seqs = first.num_decode_seqs

    # (request, position of its token) per row of the step in flight; the run's launch i
    # (from 1) samples the request's token at position + i, in the same row::
    #
    #     output_token_ids   ... | in flight | launch 1 | launch 2 | ...
    #     position                  p           p + 1      p + 2
    positions = in_flight.rows
    num_applied = num_applied_reads = 0  # the run's launches and reads in the requests
    read_times: list[float] = []  # the times of the run's reads not in them yet

    def apply(num_launched: int) -> None:
        """Write the run's launches and reads so far into the requests (the normal loop's
        counters, pending tokens and token times), before the KV manager reads them."""
        nonlocal num_applied, num_applied_reads
        num_new, num_read = num_launched - num_applied, len(read_times)
        resolved = [PLACEHOLDER_TOKEN] * num_read
        for index, (request, position) in enumerate(positions):
            ids = request.output_token_ids
            if num_new:
                ids += [pending_token_id(index)] * num_new
                request.num_computed_tokens += num_new
            if num_read:  # the tokens of launches num_applied_reads + 1, ...
                at = position + 1 + num_applied_reads
                ids[at : at + num_read] = resolved
                request.token_times += read_times
        num_applied, num_applied_reads = num_launched, num_applied_reads + num_read
        read_times.clear()

    rows = RunRows(executor, num_seqs, first.num_padded_tokens)
    stats = kv.get_kv_cache_stats()
    last_resolved = executor._last_resolved
    # The step before the one being launched: its start, its tokens' time, its features.
    prev_start, prev_ready, prev_features = in_flight.start, in_flight.tokens.ready_at, first
    launched = 0
    while launched < max_launches:
        start = clock.now()
        if start >= next_arrival:  # admitted at this start: a normal iteration's
            break
        num_new_blocks, fill = new_blocks[launched], fills[launched]
        if num_new_blocks > num_free:  # the capacity policy might preempt: a normal iteration
            break
        if num_new_blocks or fill:
            rows.flush(stats)  # the rows before saw the stats before this iteration
        if num_new_blocks:
            apply(launched)
            resources.prepare_resources(batch)
            num_free -= num_new_blocks
        features = StepFeatures(
            num_decode_seqs=num_seqs,
            decode_kv_tokens=first.decode_kv_tokens + launched * num_seqs,
            max_decode_kv=first.max_decode_kv + launched,
            num_padded_tokens=first.num_padded_tokens,
        )
        ready_at = engine.queue(features)
        launched += 1
        clock.sleep_until(prev_ready)
        if launched == 1:  # the step in flight: the normal loop's read and row
            apply(launched)
            executor._resolve(in_flight, None)
            last_resolved = executor._last_resolved
        else:
            now = clock.now()
            read_times.append(now)
            if fill:
                apply(launched)
                resources.update_resources(batch)
            rows.add(
                prev_start,
                now - max(prev_start, last_resolved),
                prev_features.decode_kv_tokens,
                prev_features.max_decode_kv,
            )
            last_resolved = now
        if num_new_blocks or fill or launched == 1:
            stats = kv.get_kv_cache_stats()
        prev_start, prev_ready, prev_features = start, ready_at, features
        clock.tick()
    if not launched:
        return 0
    apply(launched)
    rows.flush(stats)
    executor._last_resolved = last_resolved
    engine._features = prev_features  # step_work's, for the step left in flight
    tokens = SimTokens(num_seqs, prev_ready, clock)
    executor._in_flight = InFlightStep(
        batch=batch,
        rows=[(request, position + launched) for request, position in positions],
        tokens=tokens,
        host_tokens=tokens,
        copied=None,
        began=None,
        start=prev_start,
        forward_start=time.perf_counter(),
        scheduling_time=0.0,
        input_prep_time=0.0,
        enqueue_time=0.0,
        num_new=0,
        num_rejected=0,
        num_active=num_seqs,
        work=StepWork(
            context_attention=0.0,
            decode_kv_tokens=prev_features.decode_kv_tokens,
            max_decode_kv=prev_features.max_decode_kv,
            num_padded_tokens=prev_features.num_padded_tokens,
        ),
        num_context_tokens=0,
    )
    return launched
