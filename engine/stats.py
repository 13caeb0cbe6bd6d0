"""Per-iteration statistics: one small record a step, the rows of ``iterations.parquet``."""

from __future__ import annotations

from dataclasses import asdict, dataclass


# slots: the simulated engine records millions of steps (a dict per row would cost ~1 KB).
@dataclass(frozen=True, slots=True)
class IterationStats:
    iteration: int
    time: float  # clock time at the start of the step (s)
    step_latency: float  # whole step, scheduling + forward + bookkeeping (s)
    scheduling_time: float  # capacity + micro-batch passes (s)
    forward_time: float  # model engine forward + decode (s)
    num_new_requests: int  # arrived (and accepted) this step
    num_rejected_requests: int  # rejected this step
    num_context_requests: int
    num_context_tokens: int
    num_generation_requests: int
    num_paused_requests: int  # preempted this step
    num_queued_requests: int  # after the step: waiting for admission (never started or paused)
    num_active_requests: int  # arrived, unfinished, at the start of the step
    num_completed_requests: int  # finished this step
    kv_max_blocks: int
    kv_used_blocks: int
    kv_free_blocks: int
    kv_cache_hit_rate: float  # cumulative
    num_running_requests: int = 0  # after the step: started, holding KV
    num_waiting_paused_requests: int = 0  # after the step: preempted, waiting to be recomputed
    input_prep_time: float = 0.0  # host time building the model's inputs (part of forward_time)

    @property
    def num_scheduled_tokens(self) -> int:
        return self.num_context_tokens + self.num_generation_requests

    @property
    def kv_utilization(self) -> float:
        return self.kv_used_blocks / self.kv_max_blocks if self.kv_max_blocks else 0.0

    def as_row(self) -> dict[str, float | int]:
        return {**asdict(self), "kv_utilization": self.kv_utilization}
