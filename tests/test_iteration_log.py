"""engine.stats.IterationLog: its int columns widen as values need, and give back exactly what was
appended, row by row and as the frame harness.metrics builds from its arrays."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import pytest

from engine.stats import IterationLog, IterationStats
from harness.metrics import iterations_frame

INT_FIELDS = [f.name for f in dataclasses.fields(IterationStats) if f.type == "int"]
FLOAT_FIELDS = [f.name for f in dataclasses.fields(IterationStats) if f.type == "float"]
# Each past the range of the width before it (1, 2, 4 bytes), both signs.
WIDE_VALUES = [0, 127, 128, -129, 40_000, -40_000, 2**31, -(2**40), 2**63 - 1]


def _row(i: int, value: int) -> IterationStats:
    ints = {name: value + k for k, name in enumerate(INT_FIELDS)} | {"iteration": i}
    ints["kv_max_blocks"] = abs(value) + 1  # > 0: kv_utilization is defined
    floats = {name: i + k / 7 for k, name in enumerate(FLOAT_FIELDS)}
    floats["device_time"] = math.nan if i % 2 else 0.5  # NaN off CUDA
    return IterationStats(**ints, **floats)


def _rows() -> list[IterationStats]:
    # Values past 2**63 - 1 - len(INT_FIELDS) would overflow int64 in _row's "+ k".
    values = [min(v, 2**63 - 1 - len(INT_FIELDS)) for v in WIDE_VALUES]
    return [_row(i, v) for i, v in enumerate(values + values[::-1])]


def test_log_widens_and_gives_back_every_value():
    rows = _rows()
    log = IterationLog()
    for row in rows[:5]:
        log.append(row)
    # The rest as the simulated engine's runs: a whole column at once, one constant column.
    rest = rows[5:]
    varying = {
        name: [getattr(r, name) for r in rest] for name in log.columns() if name != "kv_max_blocks"
    }
    log.append_run(len(rest), varying, {"kv_max_blocks": rest[0].kv_max_blocks})
    rows[5:] = [dataclasses.replace(r, kv_max_blocks=rest[0].kv_max_blocks) for r in rest]

    assert len(log) == len(rows)
    assert [repr(r) for r in log] == [repr(r) for r in rows]  # repr: NaN equals NaN
    assert repr(log[-3:]) == repr(rows[-3:])
    # Only the columns of small values stay narrow (iteration: 0..17; kv_max_blocks: 40_001).
    narrow = {name: c.typecode for name, c in log.columns().items() if c.typecode in "bhi"}
    assert narrow == {"iteration": "b", "kv_max_blocks": "i"}

    frame = iterations_frame(log)
    pd.testing.assert_frame_equal(frame, iterations_frame(rows), check_exact=True)
    assert (frame[INT_FIELDS].dtypes == "int64").all()


def test_narrow_columns_stay_narrow_and_frame_as_int64():
    log = IterationLog()
    log.append(_row(0, 3))
    log.append(_row(1, 300))  # num_new_requests etc. to 2 bytes, iteration stays 1
    columns = log.columns()
    assert columns["iteration"].typecode == "b"
    assert columns["num_new_requests"].typecode == "h"
    frame = iterations_frame(log)
    pd.testing.assert_frame_equal(frame, iterations_frame([_row(0, 3), _row(1, 300)]))


def test_a_value_past_8_bytes_raises_as_before():
    log = IterationLog()
    with pytest.raises(OverflowError):
        log.append(_row(0, 2**63))
    with pytest.raises(OverflowError):
        log.append_run(1, {}, {name: 2**63 for name in log.columns()})


def test_clear_starts_narrow_again():
    log = IterationLog()
    log.append(_row(0, 2**40))
    log.clear()
    assert len(log) == 0
    log.append(_row(0, 1))
    assert log.columns()["num_new_requests"].typecode == "b"
    assert list(log) == [_row(0, 1)]
