"""Step-time models for the simulated engine: a scheduled batch -> predicted seconds.

A step's time depends on the batch only through a few counts, ``StepFeatures``::

    contexts (chunked prefill)                 decodes (one new token each)
    |-- prefix --|-- chunk --|                 |-------- KV length --------|*
     computed     new tokens                    read once                  new token

    num_context_tokens   sum of chunks        GEMM FLOPs    (2 * params per token)
    context_attention    sum over contexts of chunk * (computed + (chunk + 1) / 2):
                         the causal query-key pairs of the chunk (attention FLOPs)
    num_decode_seqs      decodes              GEMM rows at small M (weights read once a step)
    decode_kv_tokens     sum of KV lengths    KV bytes read by decode attention
    num_context_seqs     contexts             per-sequence overheads

Two models, one interface (``CostModel.predict``):
- ``RooflineCostModel``: the trivial baseline, from the model's size and a machine's bandwidth
  and matmul rate: a step costs max(read the weights, the GEMM FLOPs) plus its attention's KV
  bytes and FLOPs plus a fixed overhead. No profile needed; a floor, not a fit.
- ``LinearCostModel``: least squares over a profile of the real engine, fitted separately for
  decode-only steps (CUDA graphs: one launch, linear in rows and KV bytes) and steps that carry
  context tokens (eager: FLOP-bound), each as a weighted sum of the features above plus an
  intercept (launch and host overhead), weighted to minimise the relative error, with no
  coefficient below zero.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from engine.scheduler import SchedulerOutput


@dataclass(frozen=True)
class StepFeatures:
    """The counts of one step that its time depends on (see the module docstring)."""

    num_context_seqs: int = 0
    num_context_tokens: int = 0
    context_attention: float = 0.0
    num_decode_seqs: int = 0
    decode_kv_tokens: int = 0

    @classmethod
    def of(cls, batch: SchedulerOutput) -> StepFeatures:
        """Features of a scheduled batch, after ``prepare_resources`` (prefix hits counted)."""
        attention = 0.0
        for request in batch.context_requests:
            chunk = request.context_chunk_size
            attention += chunk * (request.num_computed_tokens + (chunk + 1) / 2)
        generations = batch.generation_requests
        return cls(
            num_context_seqs=len(batch.context_requests),
            num_context_tokens=batch.num_context_tokens,
            context_attention=attention,
            num_decode_seqs=len(generations),
            decode_kv_tokens=sum(r.num_tokens for r in generations),
        )

    @property
    def num_tokens(self) -> int:
        return self.num_context_tokens + self.num_decode_seqs

    @property
    def is_decode_only(self) -> bool:
        return self.num_context_tokens == 0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class CostModel(ABC):
    """Predicts the wall time of one executor step (forward, sampling and host work) from its
    ``StepFeatures``. Must be deterministic and return a positive number for a non-empty step."""

    @abstractmethod
    def predict(self, features: StepFeatures) -> float: ...


@dataclass(frozen=True)
class RooflineCostModel(CostModel):
    """The floor of a step on a machine: max(weights at ``bandwidth``, GEMM FLOPs at ``flops``)
    plus KV bytes at ``bandwidth`` and attention FLOPs at ``flops``, plus ``overhead`` seconds.

    ``bandwidth`` in bytes/s read (half a copy's read+written figure), ``flops`` in FLOP/s.
    """

    num_params: float
    weight_bytes: float
    kv_bytes_per_token: float
    attention_flops_per_pair: float  # 4 * num_layers * num_heads * head_dim (QK^T and PV)
    bandwidth: float
    flops: float
    overhead: float = 0.0

    def predict(self, features: StepFeatures) -> float:
        gemm = max(
            self.weight_bytes / self.bandwidth,
            2 * self.num_params * features.num_tokens / self.flops,
        )
        kv_read = features.decode_kv_tokens * self.kv_bytes_per_token / self.bandwidth
        attention = features.context_attention * self.attention_flops_per_pair / self.flops
        return self.overhead + gemm + kv_read + attention


DECODE_TERMS = ("intercept", "num_decode_seqs", "decode_kv_tokens")
MIXED_TERMS = (
    "intercept",
    "num_context_tokens",
    "context_attention",
    "num_context_seqs",
    "num_decode_seqs",
    "decode_kv_tokens",
)


def _design(features: StepFeatures, terms: Sequence[str]) -> list[float]:
    return [1.0 if term == "intercept" else float(getattr(features, term)) for term in terms]


@dataclass(frozen=True)
class LinearCostModel(CostModel):
    """``seconds = sum(coefficient[term] * term)`` with one coefficient set for decode-only steps
    (``decode``) and one for steps with context tokens (``mixed``); see ``fit``."""

    decode: Mapping[str, float]
    mixed: Mapping[str, float]

    def predict(self, features: StepFeatures) -> float:
        # Runs once a simulated step: attribute reads, no dict of the features.
        coefficients = self.decode if features.is_decode_only else self.mixed
        seconds = 0.0
        for term, weight in coefficients.items():
            seconds += weight if term == "intercept" else weight * getattr(features, term)
        return seconds

    @classmethod
    def fit(cls, samples: Iterable[tuple[StepFeatures, float]]) -> LinearCostModel:
        """Least squares on ``(features, measured seconds)`` samples, minimising the relative
        error (each row is divided by its measured time). Needs at least as many samples of
        each kind (decode-only, with context) as that kind has terms."""
        decode, mixed = [], []
        for features, seconds in samples:
            if seconds <= 0:
                raise ValueError(f"measured step time must be positive, got {seconds}")
            (decode if features.is_decode_only else mixed).append((features, seconds))
        return cls(
            decode=_least_squares(decode, DECODE_TERMS, "decode-only"),
            mixed=_least_squares(mixed, MIXED_TERMS, "context"),
        )


def _least_squares(
    samples: list[tuple[StepFeatures, float]], terms: Sequence[str], kind: str
) -> dict[str, float]:
    if len(samples) < len(terms):
        raise ValueError(
            f"a profile needs at least {len(terms)} {kind} steps to fit {list(terms)}; "
            f"it has {len(samples)}"
        )
    design = np.array([_design(f, terms) for f, _ in samples])
    seconds = np.array([s for _, s in samples])
    # Relative error: scale each row by 1 / its time (a 1 ms step and a 100 ms step count
    # alike). Columns are scaled to unit norm for conditioning, then scaled back.
    weighted = design / seconds[:, None]
    norms = np.linalg.norm(weighted, axis=0)
    norms[norms == 0] = 1.0
    # No term may cost negative time (noise or collinear terms can push a least-squares
    # coefficient below zero, and a large batch would then be predicted to take no time): drop
    # the most negative term and refit until none is left (a simple non-negative least squares).
    active = list(range(len(terms)))
    while True:
        solution, *_ = np.linalg.lstsq(
            weighted[:, active] / norms[active], np.ones(len(samples)), rcond=None
        )
        coefficients = solution / norms[active]
        worst = int(np.argmin(coefficients))
        if coefficients[worst] >= 0 or len(active) == 1:
            break
        del active[worst]
    fitted = dict.fromkeys(terms, 0.0)
    for index, value in zip(active, coefficients, strict=True):
        fitted[terms[index]] = float(value)
    return fitted
