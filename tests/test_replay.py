"""Workload replay inside the executor loop: open-loop arrival times, closed-loop concurrency."""

from __future__ import annotations

from types import SimpleNamespace

from engine.clock import VirtualClock
from harness.replay import replay
from harness.workload.base import RequestSpec, Workload
from tests.test_invariants import build_executor

CONFIG = dict(
    capacity="guaranteed_no_evict",
    chunking="first_come_first_served",
    max_batch_size=8,
    max_num_tokens=64,
    chunk_unit_size=4,
    tokens_per_block=4,
    num_blocks=64,
    enable_block_reuse=False,
)


def specs(n, arrival_gap=0.0, output=3):
    return tuple(
        RequestSpec(i * arrival_gap, tuple(range(10 + i, 18 + i)), output) for i in range(n)
    )


def test_open_loop_arrivals_follow_the_workload_clock():
    executor = build_executor(CONFIG, clock=VirtualClock(step_time=1.0))
    requests = replay(SimpleNamespace(executor=executor), Workload("w", specs(4, arrival_gap=10)))
    assert [r.arrival_time for r in requests] == [0.0, 10.0, 20.0, 30.0]
    assert [r.first_scheduled_time for r in requests] == [0.0, 10.0, 20.0, 30.0]
    assert all(r.num_output_tokens == 3 for r in requests)


def test_closed_loop_keeps_concurrency_and_releases_on_finish():
    executor = build_executor(CONFIG, clock=VirtualClock(step_time=1.0))
    in_flight = []
    original_step = executor.step

    def step():
        stats = original_step()
        in_flight.append(len(executor.active_requests) + executor.num_pending_arrivals)
        return stats

    executor.step = step
    workload = Workload("w", specs(7, output=4), concurrency=2)
    requests = replay(SimpleNamespace(executor=executor), workload)
    assert len(requests) == 7 and all(r.num_output_tokens == 4 for r in requests)
    assert max(in_flight) == 2
    finish_times = sorted(r.finish_time for r in requests)
    # Each request after the first two is sent at the moment an earlier one finished.
    for request in requests[2:]:
        assert request.arrival_time in finish_times
    assert [r.arrival_time for r in requests[:2]] == [0.0, 0.0]


def test_progress_bar_shows_requests_done_and_live_throughput(monkeypatch):
    import io
    import sys

    from harness.report import Progress

    class FakeTerminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with Progress(4, enabled=True, label="run") as progress:
        for done in range(1, 5):
            progress.update(done, 10 * done)
    text = terminal.getvalue()
    assert "4/4" in text and "out tok/s" in text and "run" in text
    silent = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", silent)
    with Progress(4, enabled=False) as progress:
        progress.update(4, 40)
    assert silent.getvalue() == ""
