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
# Int columns start one byte wide and widen when a value does not fit: most hold small counts, and
# a simulated hour-long trace has millions of rows (2 million: ~280 MB at 8 bytes an int).
_TYPECODES = tuple("d" if f.type == "float" else "b" for f in fields(IterationStats))
_WIDER = {"b": "h", "h": "i", "i": "q"}


def _empty_columns() -> dict[str, array]:
    return {name: array(code) for name, code in zip(_FIELDS, _TYPECODES, strict=True)}


class IterationLog(Sequence[IterationStats]):
    """The executor's per-step rows, stored by column: floats 8 bytes a value, ints as few as
    their values need (1, 2, 4 or 8).

    A list of ``IterationStats`` to its users (``len``, indexing, slicing, iteration, ``clear``)
    but millions of steps (a simulated hour-long trace) cost ~110 bytes each instead of ~500, and
    ``columns()`` hands pandas the arrays without building a row object each.
    """

    def __init__(self) -> None:
        self._columns = _empty_columns()

    def append(self, stats: IterationStats) -> None:
        row = _ROW(stats)
        try:
            for column, value in zip(self._columns.values(), row, strict=True):
                column.append(value)
        except OverflowError:  # a value too wide for its column: widen it, add it and the rest
            size = len(self._columns[_FIELDS[-1]])  # the last column is added to last
            for (name, column), value in zip(self._columns.items(), row, strict=True):
                if len(column) == size:
                    self._extend(name, size, (value,))

    def append_run(self, count: int, varying: dict[str, list], constant: dict[str, float]) -> None:
        """``count`` rows at once: the ``varying`` columns from lists of ``count`` values, every
        other column from ``constant`` (the simulated engine's runs of repeated steps)."""
        size = len(self)
        for name, column in self._columns.items():
            values = varying.get(name)
            if values is None:
                values = [constant[name]] * count
            try:
                column.extend(values)
            except OverflowError:
                self._extend(name, size, values)

    def _extend(self, name: str, size: int, values: Sequence[float]) -> None:
        """Column ``name`` cut back to ``size`` values (a failed ``extend`` keeps those before the
        value that does not fit), then ``values`` added, the column widened until they fit. An
        int past 8 bytes, or a float column's overflow, raises OverflowError as a plain array
        would."""
        column = self._columns[name]
        while True:
            del column[size:]
            try:
                column.extend(values)
                return
            except OverflowError:
                if column.typecode not in _WIDER:
                    raise
                column = self._columns[name] = array(_WIDER[column.typecode], column)

    def clear(self) -> None:
        self._columns = _empty_columns()

    def columns(self) -> dict[str, array]:
        """Each field's array: typecode ``d`` for a float field, ``b``/``h``/``i``/``q`` (the
        narrowest its values fit) for an int field."""
        return dict(self._columns)

    def __len__(self) -> int:
        return len(self._columns["iteration"])

    @overload
    def __getitem__(self, index: int) -> IterationStats: ...

    @overload
    def __getitem__(self, index: slice) -> list[IterationStats]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return IterationStats(*(column[index] for column in self._columns.values()))

    def __iter__(self) -> Iterator[IterationStats]:
        for i in range(len(self)):
            yield self[i]
