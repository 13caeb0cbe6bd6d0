"""Per-iteration statistics: one small record a step, the rows of ``iterations.parquet``."""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from operator import attrgetter
from typing import NamedTuple, overload


class StepWork(NamedTuple):
    """A step's work as the simulator's cost model sees it (``engine.sim.cost_model``), which
    the model engine counted while building its inputs (``ModelEngine.step_work``)."""

    context_attention: float = 0.0  # causal query-key pairs of the context chunks
    decode_kv_tokens: int = 0  # KV entries read by the generation requests' attention
    max_decode_kv: int = 0  # the longest generation request's KV length
    num_padded_tokens: int = 0  # rows the dense layers ran on: tokens padded to a graph bucket


# slots: the simulated engine records millions of steps (a dict per row would cost ~1 KB).
@dataclass(frozen=True, slots=True)
class IterationStats:
    """One step. With overlap scheduling (``PyExecutor(overlap=True)``) a row is written when the
    step's tokens are read, one ``step()`` call after its launch; its ``step_latency`` counts
    from when the step before it was read (the two overlap), so the rows' latencies still add
    up to the busy time, and ``forward_time`` runs from the forward's start to that read."""

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
    # The batch's work as the simulator's cost model sees it (engine/sim/cost_model.py), so a
    # real run's steps can be checked against a profile's predictions one by one.
    context_attention: float = 0.0  # causal query-key pairs of the context chunks
    decode_kv_tokens: int = 0  # KV entries read by the generation requests' attention
    max_decode_kv: int = 0  # the longest generation request's KV length
    num_padded_tokens: int = 0  # rows the dense layers ran on (engine/sim/padding.py)
    # host time until model_engine.forward returned: its kernels queued, not necessarily run
    # (part of forward_time; the rest is mostly the wait for the device)
    forward_enqueue_time: float = 0.0
    # Real engines. host_time: the host's busy time for the step, the wait for the device left
    # out (with overlap: the loop iteration that launched it). device_time: from the device
    # reaching the step's first kernel to its tokens' copy (CUDA events; NaN off CUDA), idle
    # gaps while the host queues kernels included. With overlap, a step holds the pipeline for
    # max(host_time, device_time): the time a simulator calibrates to (harness.calibrate).
    host_time: float = 0.0
    device_time: float = float("nan")

    @property
    def num_scheduled_tokens(self) -> int:
        return self.num_context_tokens + self.num_generation_requests

    @property
    def kv_utilization(self) -> float:
        return self.kv_used_blocks / self.kv_max_blocks if self.kv_max_blocks else 0.0

    def as_row(self) -> dict[str, float | int]:
        return {**asdict(self), "kv_utilization": self.kv_utilization}


_FIELDS = tuple(f.name for f in fields(IterationStats))
_ROW = attrgetter(*_FIELDS)  # an IterationStats -> its values in field order, in C
_TYPECODES = tuple("d" if f.type == "float" else "q" for f in fields(IterationStats))


class IterationLog(Sequence[IterationStats]):
    """The executor's per-step rows, stored by column (8 bytes a value).

    A list of ``IterationStats`` to its users (``len``, indexing, slicing, iteration, ``clear``)
    but millions of steps (a simulated hour-long trace) cost ~200 bytes each instead of ~500, and
    ``columns()`` hands pandas the arrays without building a row object each.
    """

    def __init__(self) -> None:
        self._columns = tuple(array(code) for code in _TYPECODES)

    def append(self, stats: IterationStats) -> None:
        for column, value in zip(self._columns, _ROW(stats), strict=True):
            column.append(value)

    def append_run(self, count: int, varying: dict[str, list], constant: dict[str, float]) -> None:
        """``count`` rows at once: the ``varying`` columns from lists of ``count`` values, every
        other column from ``constant`` (the simulated engine's runs of repeated steps)."""
        for column, name in zip(self._columns, _FIELDS, strict=True):
            values = varying.get(name)
            if values is None:
                column.extend([constant[name]] * count)
            else:
                column.extend(values)

    def clear(self) -> None:
        self._columns = tuple(array(code) for code in _TYPECODES)

    def columns(self) -> dict[str, array]:
        return dict(zip(_FIELDS, self._columns, strict=True))

    def __len__(self) -> int:
        return len(self._columns[0])

    @overload
    def __getitem__(self, index: int) -> IterationStats: ...

    @overload
    def __getitem__(self, index: slice) -> list[IterationStats]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return IterationStats(*(column[index] for column in self._columns))

    def __iter__(self) -> Iterator[IterationStats]:
        for i in range(len(self)):
            yield self[i]
