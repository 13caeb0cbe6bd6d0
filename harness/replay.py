"""Replay a workload through an LLM's executor, arrivals inside the step loop.

Open loop: every request is enqueued with its arrival time (relative to the replay's start) and
enters the active set when the executor's clock reaches it. Closed loop (``concurrency=N``): N
requests start at once and each finished request releases the next one, at that moment (as
vLLM's ``--max-concurrency`` and guidellm's concurrent profile do).
"""

from __future__ import annotations

from collections.abc import Callable

from engine import LLM, Request, SamplingParams
from engine.clock import WallClock
from harness.workload.base import Workload


def to_request(request_id: int, spec, arrival_time: float) -> Request:
    # Output lengths come from the workload, as with vLLM's benchmark --ignore-eos.
    params = SamplingParams(max_new_tokens=spec.max_new_tokens, ignore_eos=True)
    # The spec's tuple, not a copy: the requests of a whole trace hold tens of millions of tokens.
    return Request(request_id, spec.prompt_token_ids, params, arrival_time=arrival_time)


def warm_up(llm: LLM, num_requests: int = 4) -> None:
    """A few short requests (CUDA context, allocator, kernels), then forget them."""
    vocab = llm.model_engine.vocab_size
    prompts = [[(7 * i + j) % (vocab - 20) + 10 for j in range(16)] for i in range(num_requests)]
    llm.generate(prompts, SamplingParams(max_new_tokens=4, ignore_eos=True))
    reset(llm)


def reset(llm: LLM) -> None:
    """Fresh clock and empty history, so the replay's times start at 0."""
    executor = llm.executor
    assert not executor.has_unfinished_requests
    if isinstance(executor.clock, WallClock):
        executor.clock = WallClock()
    executor.finished_requests.clear()
    executor.iteration_stats.clear()


def replay(
    llm: LLM, workload: Workload, on_progress: Callable[[int, int], None] | None = None
) -> list[Request]:
    """Run every request of ``workload``; returns them in workload order.

    ``on_progress(num_finished, num_output_tokens)`` is called after each step."""
    executor = llm.executor
    origin = executor.clock.now()
    specs = workload.requests
    if workload.concurrency is None:
        requests = [to_request(i, s, origin + s.arrival_time) for i, s in enumerate(specs)]
        executor.enqueue_requests(requests)
        num_sent = len(requests)
    else:
        requests = [to_request(i, s, origin) for i, s in enumerate(specs[: workload.concurrency])]
        executor.enqueue_requests(requests)
        num_sent = len(requests)
    num_output_tokens = 0
    num_finished = 0
    while executor.has_unfinished_requests or num_sent < len(specs):
        executor.step()
        newly_finished = executor.finished_requests[num_finished:]
        num_finished = len(executor.finished_requests)
        num_output_tokens += sum(r.num_output_tokens for r in newly_finished)
        if workload.concurrency is not None and newly_finished:
            # Each finished request releases the next one, sent the moment it finished.
            released = [
                to_request(i, specs[i], done.finish_time)
                for i, done in zip(range(num_sent, len(specs)), newly_finished, strict=False)
            ]
            executor.enqueue_requests(released)
            requests.extend(released)
            num_sent += len(released)
        if on_progress is not None:
            on_progress(num_finished, num_output_tokens)
    return requests
