"""Context-chunking policies: split a token capacity among the contexts that want it.

A chunking policy is any callable ``(requests, capacity, chunk_unit_size) -> sizes`` returning one
chunk size per request (0: not this step), with ``size <= num_remaining_context_tokens`` and
``sum(sizes) <= capacity`` (``capacity is None``: unlimited).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from engine.request import Request

ChunkingPolicy = Callable[[Sequence[Request], int | None, int], list[int]]


def first_come_first_served(
    requests: Sequence[Request], capacity: int | None, chunk_unit_size: int
) -> list[int]:
    """Each request in order takes all it needs while capacity lasts; a truncated chunk is rounded
    down to a multiple of ``chunk_unit_size`` (so chunks end on block boundaries)."""
    sizes = []
    for request in requests:
        remaining = request.num_remaining_context_tokens
        size = remaining if capacity is None else min(remaining, capacity)
        if size < remaining:
            size -= size % chunk_unit_size
        if capacity is not None:
            capacity -= size
        sizes.append(size)
    return sizes


def equal_progress(
    requests: Sequence[Request], capacity: int | None, chunk_unit_size: int
) -> list[int]:
    """Round robin: every request grows by ``chunk_unit_size`` a round, until capacity or every
    context is covered. A round stops at the first increment that does not fit."""
    sizes = [0] * len(requests)
    total = 0
    while True:
        added = 0
        for i, request in enumerate(requests):
            increment = (
                min(sizes[i] + chunk_unit_size, request.num_remaining_context_tokens) - sizes[i]
            )
            if increment == 0:
                continue
            if capacity is not None and total + increment > capacity:
                break
            sizes[i] += increment
            total += increment
            added += increment
        if added == 0:
            return sizes


CHUNKING_POLICIES: dict[str, ChunkingPolicy] = {
    "first_come_first_served": first_come_first_served,
    "equal_progress": equal_progress,
}
