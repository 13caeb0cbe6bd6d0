"""Generated workloads: random prompts with drawn lengths (``synthetic``), and groups of requests
sharing a system prompt (``shared_prefix``).

Token ids are drawn uniformly from [10, vocab_size - 10), as the reference workload of
anchors.md does, which keeps clear of the special tokens at both ends of common vocabularies.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np

from .arrivals import arrival_times
from .base import RequestDraft, WorkloadError, token_tuple
from .lengths import length_dist

TOKEN_LOW = 10  # lowest id drawn; the highest is vocab_size - TOKEN_LOW - 1


def token_range(vocab_size: int) -> tuple[int, int]:
    """``[low, high)`` of drawn token ids."""
    if vocab_size <= 2 * TOKEN_LOW:
        raise WorkloadError(f"vocab_size must be > {2 * TOKEN_LOW}, got {vocab_size}")
    return TOKEN_LOW, vocab_size - TOKEN_LOW


def random_prompts(
    lengths: Sequence[int], vocab_size: int, rng: np.random.Generator
) -> list[tuple[int, ...]]:
    """One prompt of random ids per length, drawn in order from one stream."""
    low, high = token_range(vocab_size)
    lengths = np.asarray(lengths, dtype=np.int64)
    ids = rng.integers(low, high, size=int(lengths.sum()))
    bounds = np.concatenate(([0], np.cumsum(lengths)))
    return [token_tuple(ids[a:b]) for a, b in itertools.pairwise(bounds)]


def synthetic(
    num_requests: int,
    input_len: int | Mapping[str, object],
    output_len: int | Mapping[str, object],
    arrival: Mapping[str, object] | None = None,
    seed: int = 0,
) -> list[RequestDraft]:
    """``num_requests`` drafts with random prompts (made later, after clipping) and lengths from
    the two distributions; arrivals from ``arrival`` (see arrivals.arrival_times)."""
    if num_requests < 1:
        raise WorkloadError(f"num_requests must be >= 1, got {num_requests}")
    rng = np.random.default_rng(seed)
    times = arrival_times(num_requests, arrival, rng)
    ins = length_dist(input_len, "input_len").sample(num_requests, rng)
    outs = length_dist(output_len, "output_len").sample(num_requests, rng)
    return [
        RequestDraft(float(t), int(i), int(o), source=f"synthetic:{k}")
        for k, (t, i, o) in enumerate(zip(times, ins, outs, strict=True))
    ]


ORDERS = ("round_robin", "random")


def shared_prefix(
    num_groups: int,
    requests_per_group: int,
    system_prompt_len: int,
    question_len: int | Mapping[str, object],
    output_len: int | Mapping[str, object],
    vocab_size: int,
    arrival: Mapping[str, object] | None = None,
    order: str = "round_robin",
    seed: int = 0,
) -> list[RequestDraft]:
    """Groups of requests whose prompts are one group's system prompt followed by a question.

    Members of a group share exactly the ``system_prompt_len`` first tokens: the first question
    token differs between members, and the first system-prompt token between groups, so the
    shared prefix is exactly the system prompt (never longer by chance). Arrival order
    interleaves groups: ``round_robin`` (question 0 of every group, then question 1, ...) or
    ``random`` (a seeded shuffle).
    """
    if num_groups < 1 or requests_per_group < 1 or system_prompt_len < 1:
        raise WorkloadError(
            "shared_prefix needs num_groups, requests_per_group and system_prompt_len >= 1"
        )
    if order not in ORDERS:
        raise WorkloadError(f"unknown order {order!r}; allowed: {', '.join(ORDERS)}")
    low, high = token_range(vocab_size)
    if max(num_groups, requests_per_group) > high - low:
        raise WorkloadError(
            f"vocab_size {vocab_size} too small for {num_groups} groups of {requests_per_group}"
        )
    rng = np.random.default_rng(seed)
    n = num_groups * requests_per_group
    q_lens = length_dist(question_len, "question_len").sample(n, rng)
    outs = length_dist(output_len, "output_len").sample(n, rng)

    systems = rng.integers(low, high, size=(num_groups, system_prompt_len))
    systems[:, 0] = rng.choice(np.arange(low, high), size=num_groups, replace=False)
    prompts: list[tuple[int, int, tuple[int, ...]]] = []  # (group, member, prompt)
    k = 0
    for g in range(num_groups):
        firsts = rng.choice(np.arange(low, high), size=requests_per_group, replace=False)
        for m in range(requests_per_group):
            question = rng.integers(low, high, size=int(q_lens[k]))
            question[0] = firsts[m]
            prompts.append((g, m, token_tuple(np.concatenate((systems[g], question)))))
            k += 1

    if order == "round_robin":
        idx = sorted(range(n), key=lambda i: (prompts[i][1], prompts[i][0]))
    else:
        idx = rng.permutation(n).tolist()
    times = arrival_times(n, arrival, rng)
    drafts = []
    for t, i in zip(times, idx, strict=True):
        g, m, prompt = prompts[i]
        drafts.append(
            RequestDraft(
                float(t), len(prompt), int(outs[i]), source=f"shared_prefix:g{g}q{m}", prompt=prompt
            )
        )
    return drafts
