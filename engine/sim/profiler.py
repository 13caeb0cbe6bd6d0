"""``python -m engine.sim.profiler``: time the real engine over a grid of batch shapes and write
the ``Profile`` of one (device, model) that the simulated engine fits its step times to.

The simulated engine predicts a step's time from the step's ``StepFeatures`` alone; how good
that is depends on a profile that covers the shapes a serving run produces. For each grid point
this module puts the real executor into a state whose next step has the point's shape, times
that one ``executor.step()`` (``torch.cuda.synchronize`` on either side on CUDA) ``repeats``
times after ``warmup`` untimed runs, and keeps the median with the features of that very step::

    decode   B sequences decoding at KV length c        (a CUDA-graph replay on a GPU);
             ragged: the same B * c KV tokens, one sequence at k * c and B - 1 sharing the
             rest (the longest one sets the decode kernel's tail: ``max_decode_kv``)
    prefill  S fresh prompts of T tokens in all, arriving at an idle engine
    mixed    R sequences decoding at KV length C, plus one fresh prompt of T tokens
    chunked  a chunk of T tokens behind a computed prefix of P tokens (chunked prefill)
    replay   every step of a short serving run: N requests arriving one a step (prompts and
             outputs of random lengths), the mixes of decodes and prefills that runs produce

The features are captured inside ``model_engine.forward``, after ``prepare_resources`` (so a
prefix hit would be counted), and checked against the point: a profile of steps that silently
had another shape would mislead every simulation fitted to it, so a mismatch stops profiling
with ``ProfileShapeError``. A point the engine cannot run (batch size, token budget, KV pool,
model length) is skipped and listed in the profile's ``engine["skipped"]``.

Each decode point admits exactly B requests (a step's host work grows with the requests the
engine holds, not only with those it runs); mixed points share their running decodes. Every
group's requests run to completion before the next group, and the KV pool must be entirely free
between groups. The replay steps are the check on the grid: ``fit_report`` predicts them from a
fit to the grid points alone before the final fit uses them too.

    python -m engine.sim.profiler --model llama-8b --device cuda \\
        --out engine/sim/profiles/h200/llama-8b.json [--grid full|small] \\
        [--max-batch-size 256] [--max-num-tokens 8192] [--tokens-per-block 32] \\
        [--kv-fraction 0.9] [--repeats 3] [--dtype auto] [--enforce-eager] \\
        [--piecewise | --no-piecewise] [--full-graphs]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import kernels
from engine.llm import LLM, resolve_device, resolve_dtype
from engine.request import Request, SamplingParams, num_blocks_for
from engine.sim.cost_model import HostDeviceCostModel, LinearCostModel, StepFeatures
from engine.sim.profile import Profile

# The ``kind`` of a profile step: which grid group measured it.
KINDS = ("decode", "prefill", "mixed", "chunked", "replay")

# An expected feature value: exact, or an inclusive (low, high) range.
Expected = dict[str, float | tuple[float, float]]


class ProfileShapeError(RuntimeError):
    """A timed step did not have the shape its grid point asked for."""


@dataclass(frozen=True)
class ProfileGrid:
    """The batch shapes to time (see the module docstring for the four kinds).

    ``decode_batch_sizes`` x ``decode_contexts``, and ragged at ``decode_ragged_skews`` x
    ``decode_ragged_contexts`` for B >= 2k (``ragged_decode_points``); ``prefill_tokens`` x
    ``prefill_seqs`` (S <= T, the T tokens split as evenly as possible); ``mixed_decodes`` x
    ``mixed_prefill_tokens`` (T tokens in each of ``mixed_prefill_seqs`` prompts S) at each KV
    length of ``mixed_contexts`` (two or more, so the fit can tell decode rows from KV bytes in
    a mixed step; S > 1 so it can tell a prompt's own cost from the step's); ``chunked_tokens``
    behind a prefix of ``chunked_prefix`` tokens (0: no chunked points).
    """

    decode_batch_sizes: tuple[int, ...] = ()
    decode_contexts: tuple[int, ...] = ()
    decode_ragged_skews: tuple[int, ...] = ()  # k >= 2: longest / mean KV length
    decode_ragged_contexts: tuple[int, ...] = ()  # mean KV lengths c of the ragged points
    prefill_tokens: tuple[int, ...] = ()
    prefill_seqs: tuple[int, ...] = ()
    mixed_decodes: tuple[int, ...] = ()
    mixed_contexts: tuple[int, ...] = (1024,)
    mixed_prefill_tokens: tuple[int, ...] = ()
    mixed_prefill_seqs: tuple[int, ...] = (1,)
    chunked_prefix: int = 0
    chunked_tokens: tuple[int, ...] = ()
    replay_requests: int = 0
    replay_prompt_lens: tuple[int, ...] = (64, 1024)  # (low, high), uniform
    replay_output_lens: tuple[int, ...] = (16, 256)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list | tuple):
                value = tuple(value)
                object.__setattr__(self, f.name, value)  # lists in, hashable tuples kept
                values = value
            else:
                values = (value,)
            lowest = 0 if f.name in ("chunked_prefix", "replay_requests") else 1
            if not all(isinstance(v, int) and v >= lowest for v in values):
                raise ValueError(f"ProfileGrid.{f.name} must hold integers >= {lowest}: {value!r}")
        if self.mixed_decodes and min(self.mixed_contexts, default=0) < 2:
            raise ValueError(f"ProfileGrid.mixed_contexts must be >= 2: {self.mixed_contexts}")
        for name in ("replay_prompt_lens", "replay_output_lens"):
            low_high = getattr(self, name)
            if len(low_high) != 2 or low_high[0] > low_high[1]:
                raise ValueError(f"ProfileGrid.{name} must be (low, high), got {low_high!r}")
        if min(self.decode_contexts, default=2) < 2:
            raise ValueError(f"ProfileGrid.decode_contexts must be >= 2: {self.decode_contexts}")
        if min(self.decode_ragged_skews, default=2) < 2:
            raise ValueError(
                f"ProfileGrid.decode_ragged_skews must be >= 2: {self.decode_ragged_skews}"
            )

    @property
    def ragged_decode_points(self) -> list[tuple[int, int, int]]:
        """``(B, c, k)``: B sequences holding B * c KV tokens, the longest k * c (B >= 2k, so
        the other B - 1 keep at least c / 2 each on average)."""
        return [
            (b, c, k)
            for c in self.decode_ragged_contexts
            for k in self.decode_ragged_skews
            for b in self.decode_batch_sizes
            if b >= 2 * k
        ]

    @staticmethod
    def ragged_contexts(batch: int, context: int, skew: int) -> list[int]:
        """The KV lengths of a ragged point: ``skew * context`` first, then the rest of
        ``batch * context`` split evenly over the other ``batch - 1``."""
        longest = skew * context
        return [longest, *split_tokens(batch * context - longest, batch - 1)]

    @property
    def prefill_points(self) -> list[tuple[int, int]]:
        """``(T, S)`` pairs, S <= T (every sequence gets at least one token)."""
        return [(t, s) for t in self.prefill_tokens for s in self.prefill_seqs if s <= t]

    @property
    def mixed_prefill_points(self) -> list[tuple[int, int]]:
        """``(T, S)`` pairs of the prompts that join a mixed step, S <= T."""
        seqs = self.mixed_prefill_seqs
        return [(t, s) for t in self.mixed_prefill_tokens for s in seqs if s <= t]

    @property
    def chunked_points(self) -> list[tuple[int, int]]:
        """``(P, T)`` pairs."""
        return (
            [(self.chunked_prefix, t) for t in self.chunked_tokens] if self.chunked_prefix else []
        )

    def num_points(self) -> dict[str, int]:
        return {
            "decode": len(self.decode_batch_sizes) * len(self.decode_contexts)
            + len(self.ragged_decode_points),
            "prefill": len(self.prefill_points),
            "mixed": len(self.mixed_decodes)
            * len(self.mixed_contexts)
            * len(self.mixed_prefill_points),
            "chunked": len(self.chunked_points),
            "replay": self.replay_requests,  # requests; about twice as many steps
        }

    @classmethod
    def full(cls, max_batch_size: int = 256, max_num_tokens: int = 8192) -> ProfileGrid:
        """The grid for a GPU, limited to what an engine with these budgets can schedule."""
        if max_batch_size < 2 or max_num_tokens < 16:
            raise ValueError(
                "ProfileGrid.full needs max_batch_size >= 2 and max_num_tokens >= 16, got "
                f"{max_batch_size} and {max_num_tokens}"
            )
        mixed_tokens = tuple(t for t in (256, 1024, 4096) if t <= max_num_tokens)
        return cls(
            decode_batch_sizes=tuple(
                b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= max_batch_size
            ),
            # 1536: the longest KV at 256 decodes that llama-8b's pool holds on an 80 GB card
            decode_contexts=(128, 512, 1024, 1536, 2048),
            # Serving batches are ragged (Azure: longest / mean KV 1.2-4.7 a step); without
            # these points the fit cannot tell the longest sequence's cost from the mean's.
            decode_ragged_skews=(4,),
            decode_ragged_contexts=(256, 1024),
            prefill_tokens=tuple(
                t for t in (16, 64, 256, 1024, 2048, 4096, 8192) if t <= max_num_tokens
            ),
            prefill_seqs=(1, 4, 16),
            # One batch slot is the prefill's; the fullest mixed step (max_batch_size - 1
            # decodes) is the common one in a loaded run, so it is measured, not extrapolated.
            mixed_decodes=tuple(
                sorted({r for r in (16, 64) if r < max_batch_size - 1} | {max_batch_size - 1})
            ),
            mixed_contexts=(512, 1536, 2048),
            mixed_prefill_tokens=mixed_tokens,
            mixed_prefill_seqs=(1, 4),
            chunked_prefix=2048,
            chunked_tokens=mixed_tokens,
            replay_requests=300,
            replay_prompt_lens=(64, min(1024, max_num_tokens)),
        )

    @classmethod
    def small(cls) -> ProfileGrid:
        """A few tiny shapes (llama-tiny on a CPU, in seconds): for tests, not for a fit."""
        return cls(
            decode_batch_sizes=(1, 2, 4),
            decode_contexts=(16, 48),
            decode_ragged_skews=(2,),
            decode_ragged_contexts=(16,),
            prefill_tokens=(8, 32),
            prefill_seqs=(1, 4),
            mixed_decodes=(2, 4),
            mixed_contexts=(32,),
            mixed_prefill_tokens=(8, 32),
            mixed_prefill_seqs=(1, 2),
            chunked_prefix=32,
            chunked_tokens=(8, 32),
            replay_requests=6,
            replay_prompt_lens=(4, 24),
            replay_output_lens=(2, 6),
        )


@dataclass(frozen=True)
class _Limits:
    """What the engine can schedule, read once from its parts."""

    max_batch_size: int  # requests in a step (micro-batch) and holding KV (capacity)
    max_num_tokens: int | None
    chunking: bool  # the micro-batch scheduler chunks contexts
    chunk_unit: int
    tokens_per_block: int
    num_blocks: int
    max_seq_len: int

    @classmethod
    def of(cls, llm: LLM) -> _Limits:
        mb = llm.microbatch_scheduler
        kv = llm.kv_cache_manager
        return cls(
            max_batch_size=min(
                mb.max_batch_size,
                getattr(llm.capacity_scheduler, "max_num_requests", mb.max_batch_size),
            ),
            max_num_tokens=getattr(mb, "max_num_tokens", None),
            chunking=getattr(mb, "chunking", None) is not None,
            chunk_unit=getattr(mb, "chunk_unit_size", None) or kv.tokens_per_block,
            tokens_per_block=kv.tokens_per_block,
            num_blocks=kv.num_blocks,
            max_seq_len=llm.model_engine.max_seq_len,
        )

    def blocks(self, num_tokens: int) -> int:
        return num_blocks_for(num_tokens, self.tokens_per_block)

    def setup_steps(self, num_seqs: int, context: int) -> int:
        """A bound on the steps that prefill ``num_seqs`` fresh prompts of ``context - 1``
        tokens, where ``num_seqs + max(context, chunk_unit)`` fits the token budget. Requests
        prefilled early decode meanwhile: each needs that many tokens of ``max_new_tokens``."""
        budget = self.max_num_tokens
        if budget is None:
            return 3
        if self.chunking:  # at least budget - num_seqs - chunk_unit context tokens a step
            steps = math.ceil(num_seqs * context / max(1, budget - num_seqs - self.chunk_unit))
        else:  # whole prompts: at least (budget - num_seqs) // context of them a step
            steps = math.ceil(num_seqs / max(1, (budget - num_seqs) // context))
        return steps + 2

    def decodes_misfit(self, contexts: Sequence[int], max_new_tokens: int) -> str | None:
        """Why requests cannot decode at KV lengths ``contexts`` (one each) for
        ``max_new_tokens`` tokens (worst case reserved, as guaranteed_no_evict does), or None."""
        num_seqs, context = len(contexts), max(contexts)
        if num_seqs > self.max_batch_size:
            return f"{num_seqs} sequences exceed the batch limit {self.max_batch_size}"
        budget = self.max_num_tokens
        if budget is not None and num_seqs + max(context, self.chunk_unit) > budget:
            return (
                f"{num_seqs} decodes plus a {context}-token prompt exceed max_num_tokens={budget}"
            )
        length = context - 1 + max_new_tokens
        if length > self.max_seq_len:
            return f"{length} tokens a sequence exceed the model's max length {self.max_seq_len}"
        need = sum(self.blocks(c - 1 + max_new_tokens) for c in contexts)
        if need > self.num_blocks:
            return (
                f"{num_seqs} sequences of up to {length} tokens need {need} KV blocks; the pool "
                f"has {self.num_blocks}"
            )
        return None


def split_tokens(num_tokens: int, num_seqs: int) -> list[int]:
    """``num_tokens`` over ``num_seqs`` sequences, as evenly as possible."""
    base, extra = divmod(num_tokens, num_seqs)
    return [base + (i < extra) for i in range(num_seqs)]


def causal_pairs(chunk: int, prefix: int = 0) -> float:
    """``StepFeatures.context_attention`` of one chunk behind ``prefix`` computed tokens."""
    return chunk * (prefix + (chunk + 1) / 2)


@contextmanager
def overridden(obj: Any, **values: Any) -> Iterator[None]:
    """Set attributes for the duration of a block, then put the old values back."""
    old = {name: getattr(obj, name) for name in values}
    for name, value in values.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(obj, name, value)


@contextmanager
def _spy_on_forward(model_engine: Any, captured: list[StepFeatures]) -> Iterator[None]:
    """Append ``StepFeatures.of(batch)`` of every forward to ``captured``: the features of the
    batch that actually ran, after ``prepare_resources`` moved prefix hits into the counters."""
    original = model_engine.forward
    shadowed = "forward" in vars(model_engine)  # already an instance attribute (wrapped)

    def forward(batch, kv_cache_manager):
        captured.append(StepFeatures.of(batch))
        return original(batch, kv_cache_manager)

    model_engine.forward = forward
    try:
        yield
    finally:
        if shadowed:
            model_engine.forward = original
        else:
            del model_engine.forward  # the class's method again


class _Profiler:
    def __init__(
        self, llm: LLM, grid: ProfileGrid, repeats: int, warmup: int, progress: bool, seed: int
    ):
        self.llm = llm
        self.grid = grid
        self.repeats = repeats
        self.warmup = warmup
        self.progress = progress
        self.executor = llm.executor
        self.microbatch = llm.microbatch_scheduler
        self.limits = _Limits.of(llm)
        self.is_cuda = llm.device.type == "cuda"
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self._captured: list[StepFeatures] = []
        self._rng = torch.Generator().manual_seed(seed)
        vocab = llm.model_engine.vocab_size
        # Random prompts: no two share a prefix block, so no prefix hit with block reuse on.
        self._token_range = (min(10, vocab // 4), vocab - min(10, vocab // 4))

    # ---- the grid ---------------------------------------------------------------------------
    def run(self) -> None:
        self._check_idle("before profiling")
        with _spy_on_forward(self.llm.model_engine, self._captured):
            self._warm_up()
            for context in self.grid.decode_contexts:
                self._decode_group(context)
            self._ragged_decode_group()
            self._prefill_group()
            for num_decodes in self.grid.mixed_decodes:
                for context in self.grid.mixed_contexts:
                    self._mixed_group(num_decodes, context)
            self._chunked_group()
            self._replay_group()

    def _warm_up(self) -> None:
        """One short request first (allocator, first-call paths): no grid point pays for it."""
        length = min(16, self.limits.max_num_tokens or 16)
        self.executor.enqueue_requests(self._requests([length], 4))
        self.executor.run()
        self._check_idle("after the warm-up")

    def _decode_group(self, context: int) -> None:
        """For each B: admit B requests, prefill them untimed, time their decodes, drain."""
        shapes = [
            (b, [context] * b, f"B={b} c={context}") for b in sorted(self.grid.decode_batch_sizes)
        ]
        self._decode_points(f"decode  c={context}", shapes)

    def _ragged_decode_group(self) -> None:
        """Each ragged point as a decode point: one sequence at k * c, the rest sharing what is
        left of B * c."""
        shapes = [
            (b, ProfileGrid.ragged_contexts(b, c, k), f"B={b} c={c} skew={k}")
            for b, c, k in self.grid.ragged_decode_points
        ]
        self._decode_points("decode ragged", shapes)

    def _decode_points(self, name: str, shapes: list[tuple[int, list[int], str]]) -> None:
        """Each shape as a ``_decode_point``, then one log line for those that ran."""
        started = time.perf_counter()
        measured = [label for shape in shapes if (label := self._decode_point(shape)) is not None]
        if measured:
            self._log(
                f"{name}: {', '.join(measured)} "
                f"({len(measured)} points, {time.perf_counter() - started:.1f} s)"
            )

    def _decode_point(self, shape: tuple[int, list[int], str]) -> str | None:
        """One decode point: B requests at KV lengths ``contexts``; its label, or None if the
        engine cannot run it (skipped and listed)."""
        batch, contexts, label = shape
        limits = self.limits
        timed = self.warmup + self.repeats
        new_tokens = limits.setup_steps(batch, max(contexts)) + timed + 2
        reason = limits.decodes_misfit(contexts, new_tokens)
        if reason is not None:  # each skipped point is listed (larger ones fail too)
            self._skip("decode", label, reason)
            return None
        requests = self._start_decodes(contexts, new_tokens, timed)
        self._measure(
            "decode",
            f"decode {label}",
            lambda: None,
            {
                "num_context_seqs": 0,
                "num_context_tokens": 0,
                "num_decode_seqs": batch,
                "decode_kv_tokens": (sum(contexts), sum(contexts) + batch * (new_tokens - 1)),
                "max_decode_kv": (max(contexts), max(contexts) - 1 + new_tokens),
            },
        )
        self._drain(requests, f"decode {label}")
        return label

    def _prefill_group(self) -> None:
        """S fresh prompts of T tokens in all (max_new_tokens=1: they finish in the step that
        prefills them) arriving at an idle engine, once per repetition."""
        started = time.perf_counter()
        limits = self.limits
        measured = 0
        for tokens, num_seqs in self.grid.prefill_points:
            label = f"T={tokens} S={num_seqs}"
            lengths = split_tokens(tokens, num_seqs)
            need = sum(limits.blocks(n + 1) for n in lengths)
            reason = None
            if num_seqs > limits.max_batch_size:
                reason = f"{num_seqs} sequences exceed the batch limit {limits.max_batch_size}"
            elif limits.max_num_tokens is not None and tokens > limits.max_num_tokens:
                reason = f"{tokens} tokens exceed max_num_tokens={limits.max_num_tokens}"
            elif max(lengths) + 1 > limits.max_seq_len:
                reason = f"a prompt of {max(lengths)} tokens reaches the model's max length"
            elif need > limits.num_blocks:
                reason = f"needs {need} KV blocks; the pool has {limits.num_blocks}"
            if reason is not None:
                self._skip("prefill", label, reason)
                continue
            self._measure(
                "prefill",
                f"prefill {label}",
                lambda lengths=lengths: self.executor.enqueue_requests(self._requests(lengths, 1)),
                {
                    "num_context_seqs": num_seqs,
                    "num_context_tokens": tokens,
                    "context_attention": sum(causal_pairs(n) for n in lengths),
                    "num_decode_seqs": 0,
                    "decode_kv_tokens": 0,
                },
                idle_after=True,
            )
            measured += 1
        self._check_idle("after the prefill points")
        if self.grid.prefill_points:
            self._log(f"prefill: {measured} points ({time.perf_counter() - started:.1f} s)")

    def _mixed_group(self, num_decodes: int, context: int) -> None:
        """``num_decodes`` requests decoding at KV length ``context`` (set up once), and per
        repetition S fresh prompts of T tokens in all that join them for one step."""
        started = time.perf_counter()
        limits = self.limits
        points = self.grid.mixed_prefill_points
        timed_total = len(points) * (self.warmup + self.repeats)
        new_tokens = limits.setup_steps(num_decodes, context) + timed_total + 2
        length = context - 1 + new_tokens
        group_reason = limits.decodes_misfit([context] * num_decodes, new_tokens)
        if num_decodes + 1 > limits.max_batch_size:
            group_reason = (
                f"{num_decodes} decodes and a prefill exceed the batch limit "
                f"{limits.max_batch_size}"
            )
        measured = []
        for tokens, num_seqs in points:
            lengths = split_tokens(tokens, num_seqs)
            need = num_decodes * limits.blocks(length) + sum(limits.blocks(n + 1) for n in lengths)
            reason = None
            if group_reason is not None:
                reason = group_reason
            elif num_decodes + num_seqs > limits.max_batch_size:
                reason = (
                    f"{num_decodes} decodes and {num_seqs} prompts exceed the batch limit "
                    f"{limits.max_batch_size}"
                )
            elif limits.max_num_tokens is not None and num_decodes + tokens > limits.max_num_tokens:
                reason = (
                    f"{num_decodes} decodes + {tokens} prompt tokens exceed "
                    f"max_num_tokens={limits.max_num_tokens}"
                )
            elif tokens + 1 > limits.max_seq_len:
                reason = f"a prompt of {tokens} tokens reaches the model's max length"
            elif need > limits.num_blocks:
                reason = f"needs {need} KV blocks; the pool has {limits.num_blocks}"
            if reason is None:
                measured.append((tokens, num_seqs, lengths))
            else:
                self._skip("mixed", f"R={num_decodes} T={tokens} S={num_seqs} C={context}", reason)
        if not measured:
            return
        requests = self._start_decodes([context] * num_decodes, new_tokens, timed_total)
        for tokens, num_seqs, lengths in measured:
            self._measure(
                "mixed",
                f"mixed R={num_decodes} T={tokens} S={num_seqs} C={context}",
                lambda lengths=lengths: self.executor.enqueue_requests(self._requests(lengths, 1)),
                {
                    "num_context_seqs": num_seqs,
                    "num_context_tokens": tokens,
                    "context_attention": sum(causal_pairs(n) for n in lengths),
                    "num_decode_seqs": num_decodes,
                    "decode_kv_tokens": (num_decodes * context, num_decodes * length),
                },
            )
        self._drain(requests, f"mixed R={num_decodes}")
        self._log(
            f"mixed   R={num_decodes} at c={context}: T/S="
            f"{','.join(f'{t}/{s}' for t, s, _ in measured)} "
            f"({len(measured)} points, {time.perf_counter() - started:.1f} s)"
        )

    def _chunked_group(self) -> None:
        """A prompt of P + T tokens: its first chunk (P tokens, the token budget lowered to P)
        runs untimed, then its last chunk of T tokens (budget T) is timed."""
        if not self.grid.chunked_points:
            return
        started = time.perf_counter()
        limits = self.limits
        budget = limits.max_num_tokens
        measured = []
        for prefix, tokens in self.grid.chunked_points:
            label = f"P={prefix} T={tokens}"
            need = limits.blocks(prefix + tokens + 1)
            reason = None
            if not limits.chunking:
                reason = "the micro-batch scheduler does not chunk contexts (chunking=None)"
            elif prefix % limits.chunk_unit:
                reason = f"the prefix is not a multiple of the chunk unit {limits.chunk_unit}"
            elif budget is not None and max(prefix, tokens) > budget:
                reason = f"a chunk of {max(prefix, tokens)} exceeds max_num_tokens={budget}"
            elif prefix + tokens + 1 > limits.max_seq_len:
                reason = f"{prefix + tokens} tokens reach the model's max length"
            elif need > limits.num_blocks:
                reason = f"needs {need} KV blocks; the pool has {limits.num_blocks}"
            if reason is not None:
                self._skip("chunked", label, reason)
                continue

            def prepare(prefix: int = prefix, tokens: int = tokens, label: str = label) -> None:
                self.executor.enqueue_requests(self._requests([prefix + tokens], 1))
                with overridden(self.microbatch, max_num_tokens=prefix):
                    _, _, features = self._step(f"chunked {label} (prefix chunk)")
                _check(
                    features,
                    f"chunked {label} (prefix chunk)",
                    {"num_context_tokens": prefix, "num_decode_seqs": 0},
                )

            with overridden(self.microbatch, max_num_tokens=tokens):
                self._measure(
                    "chunked",
                    f"chunked {label}",
                    prepare,
                    {
                        "num_context_seqs": 1,
                        "num_context_tokens": tokens,
                        "context_attention": causal_pairs(tokens, prefix),
                        "num_decode_seqs": 0,
                        "decode_kv_tokens": 0,
                    },
                    idle_after=True,
                )
            measured.append(tokens)
        self._check_idle("after the chunked points")
        if measured:
            self._log(
                f"chunked P={self.grid.chunked_prefix}: T={','.join(map(str, measured))} "
                f"({len(measured)} points, {time.perf_counter() - started:.1f} s)"
            )

    def _replay_group(self) -> None:
        """``replay_requests`` requests, one arriving before each step, each step timed."""
        num_requests = self.grid.replay_requests
        if not num_requests:
            return
        started = time.perf_counter()
        limits = self.limits
        low, high = self.grid.replay_prompt_lens
        high = min(high, limits.max_seq_len - self.grid.replay_output_lens[1] - 1)
        if limits.max_num_tokens is not None:
            high = min(high, limits.max_num_tokens - limits.max_batch_size)
        if high < low:
            self._skip("replay", f"N={num_requests}", "no prompt length fits the engine")
            return
        prompt_lens = torch.randint(low, high + 1, (num_requests,), generator=self._rng)
        output_lens = torch.randint(
            self.grid.replay_output_lens[0],
            self.grid.replay_output_lens[1] + 1,
            (num_requests,),
            generator=self._rng,
        )
        waiting = [
            self._requests([n], m)[0]
            for n, m in zip(prompt_lens.tolist(), output_lens.tolist(), strict=True)
        ]
        waiting.reverse()  # pop() from the end: first request first
        everyone = list(waiting)
        num_steps = 0
        while waiting or self.executor.has_unfinished_requests:
            if waiting:
                self.executor.enqueue_requests([waiting.pop()])
            self._record("replay", *self._step("replay"))
            num_steps += 1
        self._drain(everyone, "replay")
        self._log(
            f"replay  {num_requests} requests: {num_steps} steps "
            f"({time.perf_counter() - started:.1f} s)"
        )

    # ---- steps ------------------------------------------------------------------------------
    def _measure(
        self,
        kind: str,
        label: str,
        prepare: Callable[[], None],
        expected: Expected,
        idle_after: bool = False,
    ) -> None:
        """``warmup`` + ``repeats`` runs of ``prepare()`` then one step; keeps the median timed
        step (the lower middle one for an even count) with its own features."""
        samples = []
        for i in range(self.warmup + self.repeats):
            prepare()
            seconds, host, features = self._step(label)
            _check(features, label, expected)
            if idle_after:
                self._check_idle(label)
            if i >= self.warmup:
                samples.append((seconds, host, features))
        self._record(kind, *sorted(samples, key=lambda s: s[0])[(len(samples) - 1) // 2])

    def _record(self, kind: str, seconds: float, host: float, features: StepFeatures) -> None:
        self.rows.append(
            {"kind": kind, **features.as_dict(), "seconds": seconds, "host_seconds": host}
        )

    def _step(self, label: str) -> tuple[float, float, StepFeatures]:
        """One timed ``executor.step()``: its seconds, the host's share (until the forward's
        kernels were queued: ``forward_enqueue_time``) and the features of the forward."""
        self._captured.clear()
        self._synchronize()
        start = time.perf_counter()
        self.executor.step()
        self._synchronize()
        seconds = time.perf_counter() - start
        if len(self._captured) != 1:
            raise ProfileShapeError(
                f"grid point {label}: the step ran {len(self._captured)} forwards, expected one"
            )
        row = self.executor.iteration_stats[-1]
        # The bucket the engine ran the step in (the spy sees the batch before the forward).
        features = replace(self._captured[0], num_padded_tokens=row.num_padded_tokens)
        return seconds, row.forward_enqueue_time, features

    def _synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.llm.device)

    # ---- requests ---------------------------------------------------------------------------
    def _requests(self, lengths: Sequence[int], max_new_tokens: int) -> list[Request]:
        low, high = self._token_range
        prompts = [torch.randint(low, high, (n,), generator=self._rng).tolist() for n in lengths]
        return self.llm.make_requests(
            prompts, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
        )

    def _start_decodes(
        self, contexts: Sequence[int], max_new_tokens: int, timed_steps: int
    ) -> list[Request]:
        """One request decoding at each KV length of ``contexts`` (prompts one token shorter;
        the early ones are a few tokens further on), with room left for ``timed_steps`` more
        tokens each."""
        num_seqs = len(contexts)
        requests = self._requests([c - 1 for c in contexts], max_new_tokens)
        self.executor.enqueue_requests(requests)
        max_steps = 4 * self.limits.setup_steps(num_seqs, max(contexts)) + 16
        for _ in range(max_steps):
            if all(r.is_generation for r in requests):
                break
            self.executor.step()
        room = min(max_new_tokens - r.num_output_tokens for r in requests)
        if not all(r.is_generation for r in requests) or room <= timed_steps:
            raise RuntimeError(
                f"setting up {num_seqs} decodes at contexts {min(contexts)}..{max(contexts)}: "
                f"after {len(self.executor.iteration_stats)} steps, states "
                f"{sorted({r.state.value for r in requests})}, {room} tokens of room left for "
                f"{timed_steps} timed steps (the set-up bound is wrong for this scheduler)"
            )
        return requests

    def _drain(self, requests: list[Request], label: str) -> None:
        """Run the group's requests out at the engine's own batch limit; no block may leak."""
        self.executor.run()
        if not all(r.is_finished for r in requests):
            raise RuntimeError(f"{label}: requests left unfinished: {requests[:4]}")
        self._check_idle(f"after {label}")

    def _check_idle(self, label: str) -> None:
        kv = self.llm.kv_cache_manager
        if self.executor.has_unfinished_requests:
            raise RuntimeError(f"{label}: the engine still has unfinished requests")
        if kv.num_free_blocks != kv.num_blocks:
            raise RuntimeError(
                f"{label}: {kv.num_blocks - kv.num_free_blocks} of {kv.num_blocks} KV blocks "
                "are still in use with no request running (a leak)"
            )

    # ---- reporting --------------------------------------------------------------------------
    def _skip(self, kind: str, label: str, reason: str) -> None:
        self.skipped.append({"kind": kind, "point": label, "reason": reason})
        self._log(f"skip {kind} {label}: {reason}")

    def _log(self, message: str) -> None:
        if self.progress:
            print(f"[profiler] {message}", file=sys.stderr, flush=True)


def _check(features: StepFeatures, label: str, expected: Expected) -> None:
    wrong = []
    for name, want in expected.items():
        got = getattr(features, name)
        if isinstance(want, tuple):
            ok = want[0] <= got <= want[1]
        else:
            ok = math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)
        if not ok:
            wrong.append(f"{name}={got} (expected {want})")
    if wrong:
        raise ProfileShapeError(
            f"grid point {label}: the timed step had {', '.join(wrong)}; its features: "
            f"{features}. A profile of steps of another shape would mislead the simulator; "
            "check that the capacity scheduler admits new requests while others run "
            "(guaranteed_no_evict or max_utilization)"
        )


def profile_engine(
    llm: LLM,
    grid: ProfileGrid,
    *,
    repeats: int = 3,
    progress: bool = True,
    warmup: int = 1,
    seed: int = 0,
) -> Profile:
    """Time ``llm``'s real engine over ``grid``; see the module docstring. ``llm`` must be idle
    (no requests) and is idle again afterwards, with every KV block free and its scheduler
    limits restored (after an error it may still hold requests). ``warmup`` untimed runs
    precede each point's ``repeats`` timed ones. The capacity scheduler must admit requests
    while others run (guaranteed_no_evict or max_utilization; static_batch cannot profile
    mixed steps)."""
    if llm.engine != "torch":
        raise ValueError(f"profile the real engine (engine='torch'), not engine={llm.engine!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    if not hasattr(llm.microbatch_scheduler, "max_batch_size"):
        raise ValueError("the micro-batch scheduler has no max_batch_size to profile decodes by")
    if llm.executor.has_unfinished_requests:
        raise ValueError("profile_engine needs an idle engine; this one has unfinished requests")
    profiler = _Profiler(llm, grid, repeats, warmup, progress, seed)
    profiler.run()
    engine = {
        **engine_settings(llm),
        "repeats": repeats,
        "warmup": warmup,
        "grid": asdict(grid),
        "skipped": profiler.skipped,
    }
    return Profile(
        model=llm.model_name,
        device=llm.device_name,
        dtype=str(llm.dtype).removeprefix("torch."),
        steps=profiler.rows,
        # JSON's own types (tuples become lists), so that a saved profile loads back equal.
        engine=json.loads(json.dumps(engine)),
        memory=memory_info(llm),
        software=software_versions(),
        command=" ".join(sys.argv),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


# ---- metadata -------------------------------------------------------------------------------
def engine_settings(llm: LLM) -> dict[str, Any]:
    mb = llm.microbatch_scheduler
    kv = llm.kv_cache_manager
    chunking = getattr(mb, "chunking", None)
    graphs = getattr(llm.model_engine, "graph_runner", None)
    piecewise = getattr(llm.model_engine, "piecewise_runner", None)
    return {
        "max_batch_size": mb.max_batch_size,
        "max_num_tokens": getattr(mb, "max_num_tokens", None),
        "tokens_per_block": kv.tokens_per_block,
        "num_kv_blocks": kv.num_blocks,
        "kv_fraction": getattr(kv, "free_gpu_memory_fraction", None),
        "enable_block_reuse": getattr(kv, "enable_block_reuse", False),
        "cuda_graphs": graphs is not None,
        "piecewise_cuda_graphs": piecewise is not None,
        "full_cuda_graphs": piecewise is not None and piecewise.is_full,
        # the buckets steps were padded to (engine/sim/padding.py)
        "cuda_graph_batch_sizes": None if graphs is None else list(graphs.batch_sizes),
        "piecewise_token_sizes": None if piecewise is None else list(piecewise.token_sizes),
        "attention_backend": llm.model_engine.model.attention_backend,
        # Triton kernels launched through kernels/launch.py's fast path (CUDA only)
        "fast_launch": llm.device.type == "cuda" and all(k.enabled for k in kernels.LAUNCHERS),
        "capacity_scheduler": type(llm.capacity_scheduler).__name__,
        "microbatch_scheduler": type(mb).__name__,
        "chunking": None if chunking is None else getattr(chunking, "__name__", repr(chunking)),
        # the decode kernel's split rule reads it (engine.sim.decode_splits)
        "num_sms": (
            torch.cuda.get_device_properties(llm.device).multi_processor_count
            if llm.device.type == "cuda"
            else None
        ),
    }


def free_bytes_for_kv(num_blocks: int, bytes_per_block: int, fraction: float) -> int:
    """The free memory from which ``PagedKVCacheManager.allocate_pool`` at ``fraction`` sizes
    a pool of exactly ``num_blocks`` blocks: half a block above ``num_blocks`` blocks (so float
    rounding of ``free * fraction`` cannot cost a block), divided by the fraction."""
    free = math.ceil((num_blocks + 0.5) * bytes_per_block / fraction)
    assert int(free * fraction) // bytes_per_block == num_blocks, (num_blocks, fraction)
    return free


def memory_info(llm: LLM) -> dict[str, int]:
    """GPU memory of the profiled engine (empty on a CPU). ``free_bytes_for_kv`` is what a
    simulated pool with the same ``free_gpu_memory_fraction`` needs to get the same blocks."""
    if llm.device.type != "cuda":
        return {}
    model = llm.model_engine.model
    kv = llm.kv_cache_manager
    kv_bytes_per_token = (
        model.num_layers * 2 * model.num_kv_heads * model.head_dim * llm.dtype.itemsize
    )
    bytes_per_block = kv_bytes_per_token * kv.tokens_per_block
    fraction = getattr(kv, "free_gpu_memory_fraction", 1.0)
    return {
        "total_bytes": torch.cuda.get_device_properties(llm.device).total_memory,
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.hf_model.parameters()),
        "kv_bytes_per_token": kv_bytes_per_token,
        "kv_pool_bytes": kv.num_blocks * bytes_per_block,
        "activation_peak_bytes": int(llm.activation_peak_bytes),
        "free_bytes_for_kv": free_bytes_for_kv(kv.num_blocks, bytes_per_block, fraction),
    }


def software_versions() -> dict[str, str]:
    import numpy
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
    }
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    return versions


# ---- report ---------------------------------------------------------------------------------
def fit_report(profile: Profile) -> str:
    """The fitted ``LinearCostModel``'s coefficients, floors and decode offsets per padded
    batch, its in-sample relative error (|predicted - measured| / measured) by kind of step,
    and how well a fit to the grid points alone predicts the replay steps (a serving run it
    has not seen), as a short table."""
    model = profile.cost_model()
    # A calibrated overlap profile fits the host's and the device's times apart.
    parts = (
        [("host: ", model.host), ("device: ", model.device)]
        if isinstance(model, HostDeviceCostModel)
        else [("", model)]
    )
    lines = []
    for name, part in parts:
        lines.append(f"{name}LinearCostModel (seconds per unit of each term; floor in seconds)")
        for kind in ("decode", "prefill", "mixed"):
            coefficients = getattr(part, kind)
            if coefficients is None:
                continue
            for term, value in coefficients.items():
                lines.append(f"  {kind:<7} {term:<19} {value:>11.4e}")
            lines.append(f"  {kind:<7} {'floor':<19} {part.floors.get(kind, 0.0):>11.4e}")
        for bucket, offset in sorted(part.decode_offsets.items()):
            lines.append(f"  {'decode':<7} {f'+ at {bucket} rows':<19} {offset:>11.4e}")
    errors: dict[str, list[float]] = {}
    host_shares: dict[str, list[float]] = {}  # host_seconds / seconds, where recorded
    for row, (features, seconds) in zip(profile.steps, profile.samples(), strict=True):
        kind = row.get("kind") or ("decode" if features.is_decode_only else "context")
        error = abs(model.predict(features) - seconds) / seconds
        for key in (kind, "all"):
            errors.setdefault(key, []).append(error)
            if "host_seconds" in row:
                host_shares.setdefault(key, []).append(row["host_seconds"] / seconds)
    lines.append(
        "in-sample relative error |predicted - measured| / measured; host: the median share of "
        "a step spent queueing its kernels (near 100%: bound by the host, not the device)"
    )
    lines.append(f"  {'kind':<8} {'steps':>5} {'median':>8} {'max':>8} {'host':>6}")
    for kind in (*KINDS, *sorted(set(errors) - {*KINDS, "all"}), "all"):
        if kind in errors:
            values = errors[kind]
            shares = host_shares.get(kind)
            host = f"{statistics.median(shares):>6.0%}" if shares else f"{'-':>6}"
            lines.append(
                f"  {kind:<8} {len(values):>5} {statistics.median(values):>8.1%} "
                f"{max(values):>8.1%} {host}"
            )
    lines += _replay_check(profile)
    return "\n".join(lines)


def _replay_check(profile: Profile) -> list[str]:
    replay, grid = [], []
    for row, sample in zip(profile.steps, profile.samples(), strict=True):
        (replay if row.get("kind") == "replay" else grid).append(sample)
    if not replay:
        return []
    try:
        model = LinearCostModel.fit(grid)
    except ValueError as error:
        return [f"replay steps: no fit to the grid points alone ({error})"]
    predicted = [model.predict(f) for f, _ in replay]
    measured = [s for _, s in replay]
    errors = sorted(abs(p - m) / m for p, m in zip(predicted, measured, strict=True))
    return [
        f"replay steps ({len(replay)}) predicted by a fit to the grid points alone: median "
        f"error {statistics.median(errors):.1%}, p90 {errors[int(0.9 * (len(errors) - 1))]:.1%}, "
        f"total time {sum(predicted) / sum(measured) - 1:+.1%}"
    ]


# ---- command line ---------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.sim.profiler",
        description="Time the real engine over a grid of batch shapes; write a sim profile.",
    )
    parser.add_argument("--model", default="llama-8b", help="preset or checkpoint directory")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--out", required=True, help="the profile file to write (JSON)")
    parser.add_argument("--grid", choices=("full", "small"), default="full")
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--max-num-tokens", type=int, default=8192)
    parser.add_argument("--tokens-per-block", type=int, default=32)
    parser.add_argument(
        "--kv-fraction", type=float, default=0.9, help="free_gpu_memory_fraction of the KV pool"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs a point (median)")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument(
        "--piecewise",
        action=argparse.BooleanOptionalAction,
        help="steps with prompt tokens as piecewise CUDA graphs (default: where they can run)",
    )
    parser.add_argument(
        "--full-graphs",
        action="store_true",
        help="steps with prompt tokens as full CUDA graphs, attention included",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    try:
        if args.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
        # Before the model is built (seconds to import and make): fail fast on a bad device.
        resolve_dtype(args.dtype, resolve_device(args.device))
        out = Path(args.out)
        if out.is_dir():
            raise ValueError(f"--out {out} is a directory; give a file such as {out}/model.json")
        try:  # before the run, not after an hour of it
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"--out {out}: cannot create its directory ({error})") from error
        grid = (
            ProfileGrid.full(args.max_batch_size, args.max_num_tokens)
            if args.grid == "full"
            else ProfileGrid.small()
        )
        llm = LLM(
            args.model,
            device=args.device,
            dtype=args.dtype,
            capacity_scheduler="guaranteed_no_evict",
            microbatch_scheduler=dict(
                max_batch_size=args.max_batch_size,
                max_num_tokens=args.max_num_tokens,
                chunking="first_come_first_served",
            ),
            kv_cache_manager=dict(
                tokens_per_block=args.tokens_per_block,
                free_gpu_memory_fraction=args.kv_fraction,
            ),
            enforce_eager=args.enforce_eager,
            piecewise_cuda_graphs=args.piecewise,
            full_cuda_graphs=args.full_graphs,
        )
        counts = grid.num_points()
        print(
            f"profiling {llm.model_name} on {llm.device} ({str(llm.dtype).removeprefix('torch.')}),"
            f" {args.grid} grid: {sum(counts.values())} points "
            f"({', '.join(f'{n} {kind}' for kind, n in counts.items())}), {args.repeats} repeats",
            flush=True,
        )
        profile = profile_engine(llm, grid, repeats=args.repeats)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    profile.command = " ".join(["python -m engine.sim.profiler", *argv])
    profile.save(out)
    by_kind = {kind: sum(row["kind"] == kind for row in profile.steps) for kind in KINDS}
    print(
        f"wrote {out}: {len(profile.steps)} steps "
        f"({', '.join(f'{n} {kind}' for kind, n in by_kind.items())}), "
        f"{len(profile.engine['skipped'])} points skipped"
    )
    try:
        print(fit_report(profile))
    except ValueError as error:  # too few points survived to fit the simulator's model
        print(f"error: the profile cannot be fitted: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
