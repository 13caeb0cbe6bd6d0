"""Exact admissions and pauses of the capacity policies on hand-built states (4 tokens a block)."""

import pytest

from policies.capacity import (
    GuaranteedNoEvictScheduler,
    MaxUtilizationScheduler,
    StaticBatchScheduler,
)
from policies.kv_cache import PagedKVCacheManager
from tests.scenario import make_request, prefill


def kv_with(num_blocks: int, reuse: bool = False) -> PagedKVCacheManager:
    return PagedKVCacheManager(tokens_per_block=4, num_blocks=num_blocks, enable_block_reuse=reuse)


def ids(requests):
    return [r.request_id for r in requests]


# ---- GUARANTEED_NO_EVICT ----------------------------------------------------------------------
def test_no_evict_reserves_worst_case_and_stops_at_first_misfit():
    kv = kv_with(10)
    r0 = make_request(0, 6, max_new_tokens=6)  # 12 tokens at completion -> 3 blocks
    prefill(kv, [r0])  # holds 2 blocks, 1 more to completion
    r1 = make_request(1, 16, max_new_tokens=8)  # 24 tokens -> 6 blocks
    r2 = make_request(2, 4, max_new_tokens=4)  # 8 tokens -> 2 blocks
    r3 = make_request(3, 1, max_new_tokens=3)  # 4 tokens -> 1 block
    out = GuaranteedNoEvictScheduler().schedule([r0, r1, r2, r3], kv)
    # free 8: r0 reserves 1 -> 7; r1 takes 6 -> 1; r2 needs 2: stop (r3 would fit, but FCFS).
    assert ids(out.fitting_requests) == [0, 1]
    assert out.paused_requests == []


def test_no_evict_head_of_line_blocking():
    kv = kv_with(10)
    r0 = make_request(0, 6, max_new_tokens=6)
    prefill(kv, [r0])
    big = make_request(1, 28, max_new_tokens=4)  # 8 blocks > 7 left
    small = make_request(2, 2, max_new_tokens=2)
    out = GuaranteedNoEvictScheduler().schedule([r0, big, small], kv)
    assert ids(out.fitting_requests) == [0]


def test_no_evict_keeps_started_first_and_respects_max_num_requests():
    kv = kv_with(20)
    pending = make_request(0, 4, max_new_tokens=4)
    r1, r2 = make_request(1, 4), make_request(2, 4)
    prefill(kv, [r1, r2])
    out = GuaranteedNoEvictScheduler(max_num_requests=2).schedule([pending, r1, r2], kv)
    assert ids(out.fitting_requests) == [1, 2]
    out = GuaranteedNoEvictScheduler(max_num_requests=3).schedule([pending, r1, r2], kv)
    assert ids(out.fitting_requests) == [1, 2, 0]


def test_no_evict_counts_shared_prefix_blocks_once():
    kv = kv_with(6, reuse=True)
    prompt = list(range(50, 59))  # 9 tokens: 2 full blocks + 1
    r0 = make_request(0, prompt, max_new_tokens=3)  # 12 tokens -> 3 blocks
    prefill(kv, [r0])  # holds 3 blocks; blocks 0, 1 cached and in use
    r1 = make_request(1, prompt, max_new_tokens=3)  # matches 2 in-use blocks: needs only 1
    r2 = make_request(2, 4, max_new_tokens=4)  # 2 blocks
    out = GuaranteedNoEvictScheduler().schedule([r0, r1, r2], kv)
    # free 3: r0 needs 0 more; r1 needs 3 - 2 shared = 1 -> 2 left; r2 takes 2.
    assert ids(out.fitting_requests) == [0, 1, 2]


# ---- STATIC_BATCH -----------------------------------------------------------------------------
def test_static_batch_admits_only_when_no_generation_in_flight():
    kv = kv_with(20)
    r0 = make_request(0, 4)
    prefill(kv, [r0])  # now generating
    late = make_request(1, 4)
    assert ids(StaticBatchScheduler().schedule([r0, late], kv).fitting_requests) == [0]
    r0_done_kv = kv_with(20)
    assert ids(StaticBatchScheduler().schedule([late], r0_done_kv).fitting_requests) == [1]


# ---- MAX_UTILIZATION --------------------------------------------------------------------------
def full_pool_of_three():
    """Three generating requests of 8 prompt tokens fill a 6-block pool; each needs a 3rd block
    for its next token (position 8)."""
    kv = kv_with(6)
    running = [make_request(i, 8) for i in range(3)]
    prefill(kv, running)
    assert kv.num_free_blocks == 0
    return kv, running


def test_max_utilization_pauses_the_last_started_request():
    kv, (r0, r1, r2) = full_pool_of_three()
    out = MaxUtilizationScheduler().schedule([r0, r1, r2], kv)
    assert ids(out.fitting_requests) == [0, 1]
    assert ids(out.paused_requests) == [2]


def test_max_utilization_victims_come_from_behind_and_truncate_the_pass():
    kv, (r0, r1, r2) = full_pool_of_three()
    pending = make_request(9, 3)  # one block
    out = MaxUtilizationScheduler().schedule([r0, pending, r1, r2], kv)
    # r0 short -> pause r2 (2 blocks free) -> r0 takes 1, pending takes 1 -> r1 short and no
    # started request behind it: stop. r1 keeps its blocks and waits.
    assert ids(out.fitting_requests) == [0, 9]
    assert ids(out.paused_requests) == [2]


def test_max_utilization_pauses_several_until_it_fits():
    kv = kv_with(8)
    r0 = make_request(0, 16, max_new_tokens=8)  # 4 blocks, generating at position 16 -> 5th
    rest = [make_request(i, 4, max_new_tokens=8) for i in (1, 2, 3)]  # 1 block each
    prefill(kv, [r0, *rest])
    # r1..r3 at 5 tokens need a 2nd block each; 1 block free.
    out = MaxUtilizationScheduler().schedule([r0, *rest], kv)
    # r0 takes the free block; r1 short -> pause r3 (1 free) -> r1 fits; r2 short, no victim
    # behind it (r3 gone) -> stop.
    assert ids(out.fitting_requests) == [0, 1]
    assert ids(out.paused_requests) == [3]


def test_max_utilization_no_victim_means_nothing_paused():
    kv = kv_with(2)
    r0 = make_request(0, 8)
    prefill(kv, [r0])
    out = MaxUtilizationScheduler().schedule([r0], kv)
    assert out.fitting_requests == [] and out.paused_requests == []


def test_max_utilization_needs_only_one_step_ahead():
    kv = kv_with(4)
    r0 = make_request(0, 8, max_new_tokens=100)  # worst case 27 blocks; next step needs 2
    assert ids(MaxUtilizationScheduler().schedule([r0], kv).fitting_requests) == [0]
    assert ids(GuaranteedNoEvictScheduler().schedule([r0], kv).fitting_requests) == []


def test_max_utilization_shared_block_of_a_victim_is_not_double_counted():
    kv = kv_with(6, reuse=True)
    prompt = list(range(200, 209))  # 9 tokens: 2 full blocks + 1
    owner = make_request(1, prompt)  # 3 blocks; its first 2 become cached
    x = make_request(0, 8)  # 2 blocks; at 9 tokens it needs a 3rd
    prefill(kv, [owner, x])
    assert kv.num_free_blocks == 1
    sharer = make_request(2, prompt, max_new_tokens=2)  # matches owner's 2 blocks, needs 1
    y = make_request(3, 5, max_new_tokens=2)  # 2 blocks
    out = MaxUtilizationScheduler().schedule([sharer, x, y, owner], kv)
    # sharer reserves the free block and the 2 shared ones. x is short -> pause owner: only its
    # private 3rd block comes free (the shared ones stay reserved by sharer) -> x fits; y is
    # short with no victim behind it -> stop. Counting the shared blocks free would admit y.
    assert ids(out.fitting_requests) == [2, 0]
    assert ids(out.paused_requests) == [1]


def test_capacity_validation():
    with pytest.raises(ValueError, match="max_num_requests"):
        MaxUtilizationScheduler(max_num_requests=0)
    with pytest.raises(ValueError, match="max_num_requests"):
        GuaranteedNoEvictScheduler(max_num_requests=-3)
