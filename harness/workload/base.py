"""What every workload produces: request specs (arrival time, prompt ids, output length), and the
error every reader raises on bad input.

A workload is built once, before any model work, and is the same whatever the policy, so
variants of an experiment see identical arrivals and prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


class WorkloadError(ValueError):
    """Bad workload input: names the file, the line (1-based) and the problem when known."""

    def __init__(self, problem: str, path: str | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + problem)
        self.path = path
        self.line = line
        self.problem = problem


@dataclass(frozen=True)
class RequestSpec:
    """One request to replay. ``arrival_time`` is seconds from the start of the run (ignored in
    closed-loop workloads, where a request is sent when an earlier one finishes)."""

    arrival_time: float
    prompt_token_ids: tuple[int, ...]
    max_new_tokens: int
    source: str = ""  # e.g. "azure_conv.csv:17": where it came from, for error messages

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class Workload:
    """Requests sorted by arrival time. ``concurrency`` set: closed loop, at most that many
    requests in flight; a new one is sent (in order) when one finishes."""

    name: str
    requests: tuple[RequestSpec, ...]
    concurrency: int | None = None
    metadata: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration(self) -> float:
        """Span of the arrivals (0 for closed loop or a single request)."""
        if self.concurrency is not None or not self.requests:
            return 0.0
        return self.requests[-1].arrival_time - self.requests[0].arrival_time


@dataclass(frozen=True)
class RequestDraft:
    """A request before its prompt exists: what readers and generators produce, and what the
    transforms (window, rate, clipping) act on. Prompts are made only after clipping, so a
    clipped request gets a prompt of exactly its clipped length, and requests a window drops
    never cost token generation.

    Exactly one prompt recipe applies: ``prompt`` (explicit ids, at least ``input_len`` of them;
    the first ``input_len`` are used), ``hash_ids`` (Mooncake blocks: equal ids, equal tokens),
    or neither (random ids, seeded).
    """

    arrival_time: float
    input_len: int
    output_len: int
    source: str = ""
    prompt: tuple[int, ...] | None = None
    hash_ids: tuple[int, ...] | None = None


# Shared int objects for token ids: a tuple built from these holds 8-byte references instead of
# a fresh 28-byte int per token (a 20M-token trace would otherwise cost ~0.8 GB). An object array,
# so a whole prompt is looked up by one numpy gather (~20 ns a token) rather than in Python. A
# cache of immutable ints: it only grows, and what it returns never changes.
_TOKEN_INTS = np.array([], dtype=object)


def token_tuple(ids: Sequence[int]) -> tuple[int, ...]:
    """``ids`` (non-negative ints, e.g. a numpy array) as a tuple of shared int objects."""
    global _TOKEN_INTS
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0:
        return ()
    top = int(ids.max())
    if top >= len(_TOKEN_INTS):
        grown = np.empty(max(top + 1, 2 * len(_TOKEN_INTS)), dtype=object)
        grown[: len(_TOKEN_INTS)] = _TOKEN_INTS  # keep the objects tuples already hold
        grown[len(_TOKEN_INTS) :] = range(len(_TOKEN_INTS), len(grown))
        _TOKEN_INTS = grown
    return tuple(_TOKEN_INTS[ids].tolist())
