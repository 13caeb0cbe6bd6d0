"""Exact batches and chunk sizes of the micro-batch scheduler and the chunking policies."""

import pytest

from engine.request import RequestState
from policies.microbatch import (
    TokenBudgetMicroBatchScheduler,
    equal_progress,
    first_come_first_served,
)
from tests.scenario import make_request


def gen(request_id):
    request = make_request(request_id, 4)
    request.state = RequestState.GENERATION
    request.output_token_ids = [7]
    request.num_computed_tokens = 4
    return request


def ctx(request_id, num_tokens):
    return make_request(request_id, num_tokens)


def chunks(requests):
    return [(r.request_id, r.context_chunk_size) for r in requests]


def test_without_chunking_a_context_costs_its_whole_prompt_and_a_misfit_ends_the_walk():
    scheduler = TokenBudgetMicroBatchScheduler(max_batch_size=8, max_num_tokens=10)
    g0, c1, c2, g3 = gen(0), ctx(1, 6), ctx(2, 5), gen(3)
    context, generation = scheduler.schedule([g0, c1, c2, g3], set())
    assert chunks(context) == [(1, 6)]
    assert [r.request_id for r in generation] == [0]  # g3 is behind the misfit c2


def test_max_batch_size_and_inflight_ids():
    scheduler = TokenBudgetMicroBatchScheduler(max_batch_size=2, max_num_tokens=None)
    requests = [gen(0), gen(1), gen(2), gen(3)]
    _, generation = scheduler.schedule(requests, {1})
    assert [r.request_id for r in generation] == [0, 2]


def test_first_come_first_served_rounds_truncated_chunks_to_the_unit():
    scheduler = TokenBudgetMicroBatchScheduler(
        max_batch_size=8, max_num_tokens=10, chunking="first_come_first_served", chunk_unit_size=4
    )
    g0, c1, c2 = gen(0), ctx(1, 6), ctx(2, 9)
    context, generation = scheduler.schedule([g0, c1, c2], set())
    # 9 left after g0: c1 takes 6; c2 could take 3, rounded down to 0 -> not this step.
    assert chunks(context) == [(1, 6)] and [r.request_id for r in generation] == [0]
    scheduler.chunk_unit_size = 2
    context, _ = scheduler.schedule([g0, c1, c2], set())
    # c2 gets 2 and is not its last chunk, so it goes first.
    assert chunks(context) == [(2, 2), (1, 6)]


def test_equal_progress_grows_round_robin():
    scheduler = TokenBudgetMicroBatchScheduler(
        max_batch_size=8, max_num_tokens=10, chunking="equal_progress", chunk_unit_size=4
    )
    c0, c1 = ctx(0, 6), ctx(1, 9)
    context, _ = scheduler.schedule([c0, c1], set())
    # rounds: (4, 4) -> c0 +2 = (6, 4); c1 +4 would make 14 > 10 -> stop.
    assert chunks(context) == [(1, 4), (0, 6)]


@pytest.mark.parametrize("policy", [first_come_first_served, equal_progress])
def test_chunking_policies_respect_capacity_and_remaining(policy):
    requests = [ctx(i, n) for i, n in enumerate([5, 17, 3, 30])]
    for capacity in (None, 0, 1, 7, 16, 100):
        sizes = policy(requests, capacity, 4)
        for size, request in zip(sizes, requests, strict=True):
            assert 0 <= size <= request.num_remaining_context_tokens
        if capacity is not None:
            assert sum(sizes) <= capacity
        else:
            assert sizes == [r.num_remaining_context_tokens for r in requests]


def test_chunking_continues_from_computed_tokens():
    request = ctx(0, 20)
    request.state = RequestState.CONTEXT
    request.num_computed_tokens = 12
    assert first_come_first_served([request], 100, 4) == [8]


def test_paused_request_longer_than_the_budget_is_recomputed_in_chunks_without_chunking():
    scheduler = TokenBudgetMicroBatchScheduler(
        max_batch_size=4, max_num_tokens=8, chunk_unit_size=4
    )
    folded = make_request(0, 6)
    folded.output_token_ids = [7, 7, 7, 7, 7]  # 11 tokens > budget 8
    folded.state = RequestState.PAUSED
    context, _ = scheduler.schedule([folded], set())
    assert chunks(context) == [(0, 8)]
    assert scheduler.reject_reason(folded) is None  # the prompt alone fits


def test_reject_reason_and_validation():
    scheduler = TokenBudgetMicroBatchScheduler(max_num_tokens=8)
    assert "max_num_tokens=8" in scheduler.reject_reason(ctx(0, 9))
    assert scheduler.reject_reason(ctx(0, 8)) is None
    chunked = TokenBudgetMicroBatchScheduler(max_num_tokens=8, chunking="equal_progress")
    assert chunked.reject_reason(ctx(0, 100)) is None
    with pytest.raises(ValueError, match="max_batch_size"):
        TokenBudgetMicroBatchScheduler(max_batch_size=0)
    with pytest.raises(ValueError, match=r"chunking must be one of \['equal_progress'"):
        TokenBudgetMicroBatchScheduler(chunking="shortest_first")
    with pytest.raises(ValueError, match="max_num_tokens"):
        TokenBudgetMicroBatchScheduler(max_num_tokens=0)
