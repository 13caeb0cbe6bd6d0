r"""A request and its sampling parameters: the record every other part of the executor reads.

State is kept as counters; lengths are derived, never stored twice. The tokens of a request are
``prompt_token_ids + output_token_ids``; the KV cache holds the first ``num_computed_tokens`` of
them::

    all_token_ids:  p0 p1 p2 p3 p4 | o0 o1 o2
                    <- num_computed_tokens -> (KV in cache)
                                           ^ next step computes tokens [num_computed, num_tokens)

A context (prefill) step computes a chunk of the not-yet-computed tokens; a generation step
computes exactly one token (the last sampled one) and samples the next. Preemption by recompute
simply sets ``num_computed_tokens = 0``: the generated tokens are folded into the context that is
recomputed later (the next context phase covers all ``num_tokens``), and no output is lost.

States::

    QUEUED --> CONTEXT --> GENERATION --> COMPLETE
       |          ^  \________|
       |          |     pause  v
       |          +------- PAUSED            (recompute: back to CONTEXT when re-admitted)
       +--> REJECTED                          (never fits; reason in ``rejection_reason``)
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field


class RequestState(enum.Enum):
    QUEUED = "queued"  # arrived, never admitted
    CONTEXT = "context"  # holds KV, prefilling (possibly over several chunks)
    GENERATION = "generation"  # holds KV, decoding one token a step
    PAUSED = "paused"  # preempted: KV released, waits to be recomputed
    COMPLETE = "complete"
    REJECTED = "rejected"


# Plain module constants: attribute access on an Enum class costs ~0.1 us, which the
# per-step predicates below pay for every active request.
_PENDING_STATES = (RequestState.QUEUED, RequestState.PAUSED)
_STARTED_STATES = (RequestState.CONTEXT, RequestState.GENERATION)
_FINISHED_STATES = (RequestState.COMPLETE, RequestState.REJECTED)
_GENERATION = RequestState.GENERATION


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # EOS or a stop token
    REJECTED = "rejected"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature == 0`` is greedy."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None  # per-request generator; None draws one from the decoder's seed
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}"
            )
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(eq=False)
class Request:
    """One generation request. Identity is the object (``eq=False``): ids need not be unique
    across runs, and requests go in sets and dicts on the hot path."""

    request_id: int
    # Read only: a list or a tuple (a trace's requests keep their workload's tuples; a copy of
    # the whole Azure trace's 22 million prompt tokens as lists costs ~180 MB).
    prompt_token_ids: Sequence[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = 0.0

    state: RequestState = RequestState.QUEUED
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Chunk size the micro-batch scheduler gave this step's context chunk (0: not scheduled).
    context_chunk_size: int = 0
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache, summed over admissions
    finish_reason: FinishReason | None = None
    rejection_reason: str | None = None

    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_time: float | None = None

    # ---- derived lengths -------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return [*self.prompt_token_ids, *self.output_token_ids]

    @property
    def max_num_tokens(self) -> int:
        """Worst-case length at completion (prompt + max_new_tokens): what reservations cover."""
        return len(self.prompt_token_ids) + self.sampling_params.max_new_tokens

    @property
    def num_remaining_context_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    # ---- state predicates ------------------------------------------------------------------
    @property
    def is_pending(self) -> bool:
        """Waits for admission (never started, or paused): holds no KV."""
        return self.state in _PENDING_STATES

    @property
    def is_started(self) -> bool:
        """Holds KV blocks: admitted and not finished or paused."""
        return self.state in _STARTED_STATES

    @property
    def is_generation(self) -> bool:
        return self.state is _GENERATION

    @property
    def is_finished(self) -> bool:
        return self.state in _FINISHED_STATES

    @property
    def is_last_context_chunk(self) -> bool:
        """This step's chunk completes the context, so the step samples a token."""
        return self.num_computed_tokens + self.context_chunk_size >= self.num_tokens

    # ---- transitions (called by the executor only) -----------------------------------------
    def start(self, now: float) -> None:
        assert self.is_pending, self.state
        self.state = RequestState.CONTEXT
        if self.first_scheduled_time is None:
            self.first_scheduled_time = now

    def pause(self) -> None:
        """Preempt by recompute: drop the KV, keep every token."""
        assert self.is_started, self.state
        self.state = RequestState.PAUSED
        self.num_computed_tokens = 0
        self.context_chunk_size = 0
        self.num_preemptions += 1

    def reject(self, reason: str, now: float) -> None:
        assert not self.is_finished, self.state
        self.state = RequestState.REJECTED
        self.finish_reason = FinishReason.REJECTED
        self.rejection_reason = reason
        self.finish_time = now

    def append_token(self, token_id: int, now: float) -> None:
        """Record a sampled token; the step that produced it computed every token before it."""
        self.output_token_ids.append(token_id)
        self.token_times.append(now)
        if self.first_token_time is None:
            self.first_token_time = now
        self.state = _GENERATION

    def append_pending_token(self, index: int) -> None:
        """Overlap scheduling: the token sampled for this request at row ``index`` of a step
        still running on the device. It counts as a token now (the next step can be scheduled
        around it) and reads as ``pending_token_id(index)`` (< 0) until ``resolve_token``."""
        self.output_token_ids.append(pending_token_id(index))
        self.state = _GENERATION

    def resolve_token(self, position: int, token_id: int, now: float) -> None:
        """The pending token at ``output_token_ids[position]`` is ``token_id``, known at ``now``."""
        self.output_token_ids[position] = token_id
        self.token_times.append(now)
        if self.first_token_time is None:
            self.first_token_time = now

    def finish(self, reason: FinishReason, now: float) -> None:
        self.state = RequestState.COMPLETE
        self.finish_reason = reason
        self.finish_time = now

    # ---- metrics (vLLM definitions; seconds) -----------------------------------------------
    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """(E2E - TTFT) / (output_len - 1), only where more than one token was generated."""
        if self.finish_time is None or self.first_token_time is None or self.num_output_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_output_tokens - 1)

    @property
    def queue_time(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    def __repr__(self) -> str:  # short: requests show up in assertion messages
        return (
            f"Request(id={self.request_id}, {self.state.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, out={self.num_output_tokens})"
        )


def pending_token_id(index: int) -> int:
    """The placeholder of a token not yet read back from the device: row ``index`` of the
    step's sampled tokens, as ``-1 - index`` (token ids are >= 0)."""
    return -1 - index


def num_blocks_for(num_tokens: int, tokens_per_block: int) -> int:
    return -(-num_tokens // tokens_per_block)  # ceil, in integers
