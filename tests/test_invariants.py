"""Property-based tests: random workloads x random configurations, invariants after every step.

After every step: free + used == total blocks (and the manager's own integrity check), no request
runs twice in a step, paused and scheduled are disjoint, batch-size and token budgets hold, chunk
sizes are in range, with and without overlap scheduling. At the end: every request is complete
or rejected with a reason, no block is held, and outputs equal those of an unconstrained run
(the fake engine's tokens depend only on content, so scheduling must not change them).
"""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine.clock import VirtualClock
from engine.decoder import Decoder
from engine.executor import PyExecutor
from engine.request import FinishReason, Request, RequestState, SamplingParams
from engine.resource_manager import ResourceManager
from engine.scheduler import Scheduler
from policies import registry
from policies.kv_cache import PagedKVCacheManager
from policies.microbatch import TokenBudgetMicroBatchScheduler
from tests.fakes import EOS, FakeModelEngine, next_token

VOCAB = 64
MAX_SEQ_LEN = 96


@st.composite
def configs(draw):
    tokens_per_block = draw(st.sampled_from([1, 2, 4, 8]))
    max_num_tokens = draw(st.one_of(st.none(), st.integers(8, 64)))
    unit_cap = max_num_tokens or 16
    return dict(
        capacity=draw(st.sampled_from(sorted(registry.REGISTRY["capacity_scheduler"]))),
        chunking=draw(st.sampled_from([None, "first_come_first_served", "equal_progress"])),
        max_batch_size=draw(st.integers(1, 8)),
        max_num_tokens=max_num_tokens,
        chunk_unit_size=draw(st.one_of(st.none(), st.integers(1, min(unit_cap, 8)))),
        tokens_per_block=tokens_per_block,
        # Pools from "rejects most requests" to "fits everything", weighted to the middle where
        # MAX_UTILIZATION preempts and GUARANTEED_NO_EVICT queues.
        num_blocks=max(1, draw(st.integers(8, 160)) // tokens_per_block),
        enable_block_reuse=draw(st.booleans()),
        # Overlap scheduling: step n+1 scheduled before step n's tokens are read.
        overlap=draw(st.booleans()),
    )


@st.composite
def workloads(draw):
    bases = [list(range(10 + 5 * b, 10 + 5 * b + 24)) for b in range(3)]  # shared prefixes
    requests = []
    for i in range(draw(st.integers(1, 12))):
        base = bases[draw(st.integers(0, 2))][: draw(st.integers(0, 24))]
        suffix = draw(st.lists(st.integers(3, VOCAB - 1), min_size=0, max_size=20))
        prompt = base + suffix or [5]
        params = SamplingParams(
            max_new_tokens=draw(st.integers(1, 12)), ignore_eos=draw(st.booleans())
        )
        requests.append((i, prompt, params, draw(st.integers(0, 6)) * 0.5))
    return requests


def build_executor(config, clock=None):
    microbatch = TokenBudgetMicroBatchScheduler(
        max_batch_size=config["max_batch_size"],
        max_num_tokens=config["max_num_tokens"],
        chunking=config["chunking"],
        chunk_unit_size=config["chunk_unit_size"] or config["tokens_per_block"],
    )
    if microbatch.max_num_tokens is not None:
        microbatch.chunk_unit_size = min(microbatch.chunk_unit_size, microbatch.max_num_tokens)
    capacity = registry.build(
        "capacity_scheduler", config["capacity"], max_num_requests=config["max_batch_size"]
    )
    kv = PagedKVCacheManager(
        tokens_per_block=config["tokens_per_block"],
        num_blocks=config["num_blocks"],
        enable_block_reuse=config["enable_block_reuse"],
    )
    return PyExecutor(
        FakeModelEngine(VOCAB, MAX_SEQ_LEN),
        Decoder(),
        Scheduler(capacity, microbatch),
        ResourceManager(kv),
        clock=clock or VirtualClock(step_time=1.0),
        eos_token_id=EOS,
        overlap=config.get("overlap", False),
    )


def make_requests(workload):
    return [Request(i, list(p), params, arrival_time=t) for i, p, params, t in workload]


def expected_output(prompt, params):
    tokens = list(prompt)
    out = []
    while len(out) < params.max_new_tokens:
        token = next_token(tokens, VOCAB)
        tokens.append(token)
        out.append(token)
        if token == EOS and not params.ignore_eos:
            break
    return out


def same_batch(a, b) -> bool:
    def ids(requests):
        return [r.request_id for r in requests]

    return (
        ids(a.context_requests) == ids(b.context_requests)
        and ids(a.generation_requests) == ids(b.generation_requests)
        and ids(a.paused_requests) == ids(b.paused_requests)
        and a.num_fitting_requests == b.num_fitting_requests
    )


def run_checked(executor, requests):
    """Step to the end, checking the invariants after every step."""
    kv = executor.kv_cache_manager
    microbatch = executor.scheduler.microbatch_scheduler
    scheduler = executor.scheduler
    seen = []
    original = scheduler.schedule_request

    def spy(active, kv_manager, inflight=None):
        started_before = {r for r in active if r.is_started}
        num_repeated = scheduler.num_repeated_steps
        out = original(active, kv_manager, inflight)
        if scheduler.num_repeated_steps > num_repeated:
            # A steady step repeated without the policies: they must agree (asked afresh).
            fresh = Scheduler(scheduler.capacity_scheduler, microbatch)
            assert same_batch(fresh.schedule_request(active, kv_manager, inflight), out)
        seen.append((out, started_before))
        return out

    scheduler.schedule_request = spy
    executor.enqueue_requests(requests)
    num_steps = 0
    while executor.has_unfinished_requests:
        executor.step()
        num_steps += 1
        assert num_steps < 5000, "executor did not converge"
        kv.check_integrity()
        stats = kv.get_kv_cache_stats()
        assert stats.free_num_blocks + stats.used_num_blocks == stats.max_num_blocks
        if not seen:
            continue
        out, started_before = seen[-1]
        scheduled = out.scheduled_requests
        assert len(set(scheduled)) == len(scheduled), "a request runs twice in one step"
        assert not set(scheduled) & set(out.paused_requests)
        assert set(out.paused_requests) <= started_before
        assert out.batch_size <= microbatch.max_batch_size
        assert out.num_fitting_requests <= executor.scheduler.capacity_scheduler.max_num_requests
        if microbatch.max_num_tokens is not None:
            assert out.num_tokens <= microbatch.max_num_tokens
        for request in out.context_requests:
            assert request.context_chunk_size >= 1
        seen.clear()
    return num_steps


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs(), workload=workloads())
def test_invariants_hold_after_every_step(config, workload):
    executor = build_executor(config)
    requests = make_requests(workload)
    run_checked(executor, requests)
    kv = executor.kv_cache_manager
    event(f"steady steps repeated: {executor.scheduler.num_repeated_steps > 0}")
    assert kv.get_kv_cache_stats().used_num_blocks == 0, "blocks leaked"
    assert sorted(r.request_id for r in executor.finished_requests) == list(range(len(requests)))
    for request in requests:
        assert request.is_finished
        event(f"overlap: {config['overlap']}")
        event(f"preempted: {request.num_preemptions > 0}")
        event(f"prefix hit: {request.num_cached_tokens > 0}")
        event(f"rejected: {request.state is RequestState.REJECTED}")
        if request.state is RequestState.REJECTED:
            assert request.rejection_reason
            assert request.finish_reason is FinishReason.REJECTED
        else:
            assert request.output_token_ids == expected_output(
                request.prompt_token_ids, request.sampling_params
            ), f"{request} under {config}"
            assert request.finish_time >= request.first_token_time >= request.arrival_time


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=configs().map(lambda c: {**c, "capacity": "max_utilization"}),
    workload=workloads(),
    pool_tokens=st.integers(40, 80),
)
def test_invariants_hold_under_preemption_pressure(config, workload, pool_tokens):
    """MAX_UTILIZATION on a pool that holds a few requests at most: pauses are the rule."""
    config["num_blocks"] = pool_tokens // config["tokens_per_block"]
    test_invariants_hold_after_every_step.hypothesis.inner_test(config, workload)


@settings(max_examples=60, deadline=None)
@given(workload=workloads())
def test_rejections_are_exactly_the_requests_that_can_never_fit(workload):
    """With a pool of 16 blocks of 4, a request is rejected iff its worst case needs more."""
    config = dict(
        capacity="max_utilization",
        chunking="first_come_first_served",
        max_batch_size=4,
        max_num_tokens=16,
        chunk_unit_size=4,
        tokens_per_block=4,
        num_blocks=6,
        enable_block_reuse=True,
    )
    executor = build_executor(config)
    requests = make_requests(workload)
    run_checked(executor, requests)
    for request in requests:
        too_big = -(-request.max_num_tokens // 4) > 6
        assert (request.state is RequestState.REJECTED) == too_big, request
