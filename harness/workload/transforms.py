"""Transforms applied to every workload's drafts, always in this order:

1. window: keep requests with ``start <= arrival < start + duration`` (seconds, on the source's
   arrival times), then re-base so the first kept request arrives at 0;
2. ``max_requests``: keep the first N (in arrival order);
3. timing: ``rate`` rescales arrival times so the mean rate is ``rate`` req/s, i.e. the mean gap
   between consecutive arrivals is ``1 / rate`` (n requests over their span, n - 1 gaps), or
   ``time_scale`` multiplies every arrival time (both: error; neither is allowed in closed loop,
   where arrival times are ignored);
4. length caps: ``max_input_len`` and ``max_output_len`` cap each length; then, given the
   model's ``max_seq_len``, a request with ``input + output > max_seq_len`` is clipped: the
   output keeps as much as it can up to the larger of what the prompt leaves and half of
   ``max_seq_len``, and the prompt is cut to what the output leaves. So short prompts keep long
   outputs, long prompts keep their head, and every request fits (``input + output <=
   max_seq_len``). Counts of clipped requests go to the metadata.

Prompts are made after all of this (see the package's ``build_workload``), so a clipped prompt
is exactly as long as its clipped length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

from .base import RequestDraft, WorkloadError


@dataclass(frozen=True)
class Transforms:
    start: float | None = None
    duration: float | None = None
    max_requests: int | None = None
    rate: float | None = None
    time_scale: float | None = None
    max_input_len: int | None = None
    max_output_len: int | None = None

    def __post_init__(self) -> None:
        if self.rate is not None and self.time_scale is not None:
            raise WorkloadError("give 'rate' or 'time_scale', not both")
        checks = {
            "start": (self.start, 0, True),
            "duration": (self.duration, 0, False),
            "max_requests": (self.max_requests, 1, True),
            "rate": (self.rate, 0, False),
            "time_scale": (self.time_scale, 0, False),
            "max_input_len": (self.max_input_len, 1, True),
            "max_output_len": (self.max_output_len, 1, True),
        }
        for name, (value, low, inclusive) in checks.items():
            if value is None:
                continue
            ok = value >= low if inclusive else value > low
            if not ok or (isinstance(value, float) and math.isnan(value)):
                sign = ">=" if inclusive else ">"
                raise WorkloadError(f"{name} must be {sign} {low}, got {value}")


TRANSFORM_KEYS = tuple(f.name for f in fields(Transforms))


def window(
    drafts: Sequence[RequestDraft], start: float | None, duration: float | None
) -> list[RequestDraft]:
    """Requests arriving in ``[start, start + duration)``, re-based so the first is at 0."""
    lo = 0.0 if start is None else start
    hi = math.inf if duration is None else lo + duration
    kept = [d for d in drafts if lo <= d.arrival_time < hi]
    if not kept:
        raise WorkloadError(f"the window [{lo}, {hi}) s keeps no request")
    origin = kept[0].arrival_time
    return [replace(d, arrival_time=d.arrival_time - origin) for d in kept]


def rescale_rate(drafts: Sequence[RequestDraft], rate: float) -> list[RequestDraft]:
    """Arrival times scaled so that ``(n - 1) / span == rate`` (first arrival stays put)."""
    if len(drafts) < 2:
        return list(drafts)
    first, last = drafts[0].arrival_time, drafts[-1].arrival_time
    if last <= first:
        raise WorkloadError("'rate' cannot rescale arrivals that are all at the same time")
    return scale_time(drafts, (len(drafts) - 1) / (rate * (last - first)))


def scale_time(drafts: Sequence[RequestDraft], factor: float) -> list[RequestDraft]:
    """Every arrival time multiplied by ``factor``."""
    return [replace(d, arrival_time=d.arrival_time * factor) for d in drafts]


def clip_lengths(
    drafts: Sequence[RequestDraft],
    max_seq_len: int,
    max_input_len: int | None = None,
    max_output_len: int | None = None,
) -> tuple[list[RequestDraft], dict[str, int]]:
    """Lengths capped and fitted to ``max_seq_len`` (rule in the module docstring); returns the
    drafts and counts ``clipped_input``, ``clipped_output``, ``clipped_requests``."""
    if max_seq_len < 2:
        raise WorkloadError(
            f"max_seq_len must be >= 2 (one prompt and one output token), got {max_seq_len}"
        )
    out: list[RequestDraft] = []
    n_in = n_out = n_req = 0
    half = max_seq_len // 2
    for d in drafts:
        i, o = d.input_len, d.output_len
        if max_input_len is not None:
            i = min(i, max_input_len)
        if max_output_len is not None:
            o = min(o, max_output_len)
        if i + o > max_seq_len:
            o = min(o, max(max_seq_len - i, half))
            i = min(i, max_seq_len - o)
        n_in += i < d.input_len
        n_out += o < d.output_len
        n_req += (i, o) != (d.input_len, d.output_len)
        out.append(
            d if (i, o) == (d.input_len, d.output_len) else replace(d, input_len=i, output_len=o)
        )
    return out, {"clipped_input": n_in, "clipped_output": n_out, "clipped_requests": n_req}


def apply_transforms(
    drafts: Sequence[RequestDraft], t: Transforms, max_seq_len: int, closed_loop: bool = False
) -> tuple[list[RequestDraft], dict[str, object]]:
    """All transforms in the documented order; returns the drafts and metadata about them."""
    meta: dict[str, object] = {"source_requests": len(drafts)}
    out = list(drafts)
    if t.start is not None or t.duration is not None:
        out = window(out, t.start, t.duration)
    if t.max_requests is not None:
        out = out[: t.max_requests]
    if closed_loop and (t.rate is not None or t.time_scale is not None):
        raise WorkloadError("'rate' and 'time_scale' have no meaning in closed loop (concurrency)")
    if t.rate is not None:
        out = rescale_rate(out, t.rate)
    elif t.time_scale is not None:
        out = scale_time(out, t.time_scale)
    out, counts = clip_lengths(out, max_seq_len, t.max_input_len, t.max_output_len)
    meta.update(counts)
    return out, meta
