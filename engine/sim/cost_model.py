"""Step-time models for the simulated engine: a scheduled batch -> predicted seconds.

A step's time depends on the batch only through a few counts, ``StepFeatures``::

    contexts (chunked prefill)                 decodes (one new token each)
    |-- prefix --|-- chunk --|                 |-------- KV length --------|*
     computed     new tokens                    read once                  new token

    num_context_tokens   sum of chunks
    num_padded_tokens    the rows the GEMMs   GEMM FLOPs    (2 * params per row): the step's
                         run on               tokens padded to the real engine's graph bucket
                                              (engine/sim/padding.py), up to 2x its tokens
    context_attention    sum over contexts of chunk * (computed + (chunk + 1) / 2):
                         the causal query-key pairs of the chunk (attention FLOPs)
    num_decode_seqs      decodes              GEMM rows at small M (weights read once a step)
    decode_kv_tokens     sum of KV lengths    KV bytes read by decode attention
    max_decode_kv        longest KV length    the tail of decode attention: one program walks
                                              one sequence (or one split of it), so with ragged
                                              lengths the longest sets the kernel's time; the
                                              fits read it as ``decode_span``, the longest KV
                                              range one program walks (``DecodeSplits``)
    num_context_seqs     contexts             per-sequence overheads

Two models, one interface (``CostModel.predict``):
- ``RooflineCostModel``: the trivial baseline, from the model's size and a machine's bandwidth
  and matmul rate: a step costs max(read the weights, the GEMM FLOPs) plus its attention's KV
  bytes and FLOPs plus a fixed overhead. No profile needed; a floor, not a fit.
- ``LinearCostModel``: least squares over a profile of the real engine, fitted separately for
  decode-only steps (CUDA graphs: one launch, linear in rows and KV bytes) and steps with
  prompt tokens (FLOP-bound, on the padded rows), each as a weighted sum of the features above
  plus an intercept, with no coefficient below zero, minimising the relative error (every step
  alike) or, for profiles calibrated that way, the absolute one (each step by its time: the
  total a queue integrates); an overlap profile's fits are then scaled to their steps' totals
  (``match_totals``). Where a grid gives enough prefill-only points, a mixed step costs
  its padded rows at the prefill's rate plus its decodes' attention at the decode fit's, plus
  its own intercept. A decode-only step also gets an offset for its padded batch (its CUDA
  graph), where the fit has enough steps of it: the graphs' GEMM kernels differ, so the time
  steps beside the line (on the H200, llama-1b's decode of 33 sequences, the 48-row graph, took
  19% longer than one of 32, and batches of 49-64 less than batches of 37-44). Each kind also
  gets a floor: ``seconds = max(floor, linear)`` (the decode offset inside the max). An eager
  step launches every layer's kernels from Python, so a short one costs the host's launch time
  (tens of ms for a 32-layer model on a slow host) however few tokens it has; the device time
  (the linear part) overtakes it only at a few thousand tokens, and one straight line cannot fit
  both sides of that knee::

      seconds |            /  linear (device)
              |           /
              |__________/   floor (host: launches)
              +-------------------- context tokens

``HostDeviceCostModel``: with overlap scheduling a step holds the pipeline for the longer of the
host's time (schedule, build the inputs, launch the kernels) and the device's
(``IterationStats.host_time``, ``device_time``). Where a profile's serving steps record both, each
gets its own ``LinearCostModel`` and a step costs ``max(host_time_scale * host, device)``. The
host is the part that changes with the machine: on the H200 hosts the same llama-1b run took
4.5 ms or 8 ms of host time per mixed step from one machine to another, and its device time did
not move (docs/performance.md, "Host speed"); ``host_time_scale`` simulates that host.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from engine.scheduler import SchedulerOutput
from engine.sim.padding import StepPadding

if TYPE_CHECKING:
    from engine.sim.decode_splits import DecodeSplits


@dataclass(frozen=True)
class StepFeatures:
    """The counts of one step that its time depends on (see the module docstring)."""

    num_context_seqs: int = 0
    num_context_tokens: int = 0
    context_attention: float = 0.0
    num_decode_seqs: int = 0
    decode_kv_tokens: int = 0
    max_decode_kv: int = 0
    num_padded_tokens: int = 0  # 0: not padded, as many as num_tokens (set so on construction)

    def __post_init__(self) -> None:
        if self.num_padded_tokens == 0:
            object.__setattr__(self, "num_padded_tokens", self.num_tokens)

    @classmethod
    def of(cls, batch: SchedulerOutput, padding: StepPadding | None = None) -> StepFeatures:
        """Features of a scheduled batch, after ``prepare_resources`` (prefix hits counted),
        its tokens padded as ``padding`` says (None: not padded)."""
        # One pass over the decodes for both KV counts (SchedulerOutput.decode_kv_tokens and
        # .max_decode_kv): this runs every simulated step.
        lengths = [r.num_tokens for r in batch.generation_requests]
        num_context_tokens = batch.num_context_tokens
        num_padded = num_context_tokens + len(lengths)
        if padding is not None:
            num_padded = padding.padded(num_padded, is_decode_only=num_context_tokens == 0)
        return cls(
            num_context_seqs=len(batch.context_requests),
            num_context_tokens=num_context_tokens,
            context_attention=batch.context_attention,
            num_decode_seqs=len(lengths),
            decode_kv_tokens=sum(lengths),
            max_decode_kv=max(lengths, default=0),
            num_padded_tokens=num_padded,
        )

    @property
    def num_tokens(self) -> int:
        return self.num_context_tokens + self.num_decode_seqs

    @property
    def is_decode_only(self) -> bool:
        return self.num_context_tokens == 0

    @property
    def kind(self) -> str:
        """``decode`` (decodes only), ``prefill`` (contexts only) or ``mixed``: the kinds the
        cost models fit separately."""
        if self.num_context_tokens == 0:
            return "decode"
        return "prefill" if self.num_decode_seqs == 0 else "mixed"

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
            2 * self.num_params * features.num_padded_tokens / self.flops,
        )
        kv_read = features.decode_kv_tokens * self.kv_bytes_per_token / self.bandwidth
        attention = features.context_attention * self.attention_flops_per_pair / self.flops
        return self.overhead + gemm + kv_read + attention


@dataclass(frozen=True)
class StepPhases:
    """A step's time as the host pipeline sees it (seconds): ``host``, the launching
    iteration's host work (the wait for the device left out), of which ``launch`` is the forward's
    launches, which run beside the device's work; ``device``, the step's device time."""

    host: float
    launch: float
    device: float

    @property
    def before_launch(self) -> float:
        """Host work before the device can start the step: scheduling, KV, reading the last
        step back (``host - launch``; the reading comes after, charged before here)."""
        return self.host - self.launch


@dataclass(frozen=True)
class HostDeviceCostModel(CostModel):
    """An overlap step: ``max(host_time_scale * host.predict, device.predict)``, the host's and
    the device's times fitted apart (``Profile.cost_model``). ``host_time_scale``: the simulated
    host's time over the profiled one's (2.0: a host twice as slow), ``device_time_scale`` the
    device's; ``harness.calibrate`` prints each real run's. ``launch`` (optional): the
    forward's launch time, the part of ``host`` that overlaps the device (``phases``; the
    simulated engine's host pipeline)."""

    host: CostModel
    device: CostModel
    host_time_scale: float = 1.0
    launch: CostModel | None = None
    device_time_scale: float = 1.0  # the simulated device's time over the profiled one's

    def __post_init__(self) -> None:
        for name in ("host_time_scale", "device_time_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def predict(self, features: StepFeatures) -> float:
        host = self.host_time_scale * self.host.predict(features)
        return max(host, self.device_time_scale * self.device.predict(features))

    def predict_on_host(
        self, features: StepFeatures, host_speed: float, device_speed: float = 1.0
    ) -> float:
        """``predict`` with the host's time scaled by ``host_speed`` as well (the scale of the
        second the step starts in: ``engine.sim.host_timeline``), and the device's by
        ``device_speed`` (the power cap's: ``engine.sim.power``)."""
        host = self.host_time_scale * host_speed * self.host.predict(features)
        return max(host, self.device_time_scale * device_speed * self.device.predict(features))

    def phases(self, features: StepFeatures, host_speed: float = 1.0) -> StepPhases:
        """The step's host, launch and device times, the host's scaled by
        ``host_time_scale`` and ``host_speed``; the launch is at most the host's time (they
        are fitted apart)."""
        if self.launch is None:
            raise ValueError("phases need a launch model (a profile with host_seconds)")
        scale = self.host_time_scale * host_speed
        host = scale * self.host.predict(features)
        launch = min(scale * self.launch.predict(features), host)
        return StepPhases(host, launch, self.device_time_scale * self.device.predict(features))


STEP_KINDS = ("decode", "prefill", "mixed")  # StepFeatures.kind
ERRORS = ("relative", "absolute")  # what LinearCostModel.fit minimises (squared, summed)
SPECIAL_TERMS = ("intercept", "decode_span")  # not StepFeatures attributes (``_term``)
# ``decode_span``: ``max_decode_kv`` over the decode kernel's splits (``DecodeSplits``), or
# ``max_decode_kv`` itself for a model without a split rule.
DECODE_TERMS = ("intercept", "num_decode_seqs", "decode_kv_tokens", "decode_span")
PREFILL_TERMS = ("intercept", "num_padded_tokens", "context_attention", "num_context_seqs")
MIXED_TERMS = (
    "intercept",
    "num_padded_tokens",
    "context_attention",
    "num_context_seqs",
    "num_decode_seqs",
    "decode_kv_tokens",
    "decode_span",
)


def _design(
    features: StepFeatures, terms: Sequence[str], splits: DecodeSplits | None = None
) -> list[float]:
    return [_term(features, term, splits) for term in terms]


def _term(features: StepFeatures, term: str, splits: DecodeSplits | None) -> float:
    if term == "intercept":
        return 1.0
    if term == "decode_span":
        return _decode_span(features, splits)
    return float(getattr(features, term))


def _decode_span(features: StepFeatures, splits: DecodeSplits | None) -> float:
    """The longest KV range one program of the decode kernel walks (``DecodeSplits.span``), or
    the longest sequence whole without a split rule."""
    return features.max_decode_kv if splits is None else splits.span(features)


@dataclass(frozen=True)
class LinearCostModel(CostModel):
    """``seconds = max(floor, sum(coefficient[term] * term))`` with one coefficient set and
    floor for each kind of step: ``decode`` (decode-only), ``prefill`` (contexts, no decodes)
    and ``mixed`` (contexts and decodes; also prefill steps when ``prefill`` is None). See
    ``fit``."""

    decode: Mapping[str, float]
    mixed: Mapping[str, float]
    prefill: Mapping[str, float] | None = None
    floors: Mapping[str, float] = field(default_factory=dict)  # kind -> seconds (default 0)
    # A decode-only step's padded batch (its CUDA graph) -> seconds added to its line, inside
    # the floor's max: a graph's GEMMs run on its padded rows, with kernels picked for that
    # size, so a bucket's time steps up or down beside the line (``fit``). A bucket not named
    # takes the offset of the nearest one named below it (the smallest one's below them all).
    decode_offsets: Mapping[int, float] = field(default_factory=dict)
    # How the decode kernel splits a step's sequences: what ``decode_span`` reads (None: one
    # split, ``max_decode_kv``).
    decode_splits: DecodeSplits | None = None
    # kind -> (floor, intercept, its nonzero (term, weight) pairs but decode_span, its weight,
    # padded -> offset or None): what predict reads. The offsets are decode_offsets, and the
    # buckets resolved since.
    _compiled: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        compiled = {}
        for kind in STEP_KINDS:
            coefficients = getattr(self, kind)
            if coefficients is None:  # prefill steps fall to mixed
                continue
            terms = tuple((t, w) for t, w in coefficients.items() if t not in SPECIAL_TERMS and w)
            has_offsets = kind == "decode" and bool(self.decode_offsets)
            offsets = dict(self.decode_offsets) if has_offsets else None
            floor = self.floors.get(kind, 0.0)
            intercept, span = coefficients.get("intercept", 0.0), coefficients.get("decode_span")
            compiled[kind] = (floor, intercept, terms, span or 0.0, offsets)
        object.__setattr__(self, "_compiled", compiled)

    def predict(self, features: StepFeatures) -> float:
        # Runs once a simulated step (twice with HostDeviceCostModel): attribute reads of the
        # nonzero terms only, no dict of the features.
        if features.num_context_tokens == 0:
            kind = "decode"
        elif features.num_decode_seqs == 0 and self.prefill is not None:
            kind = "prefill"
        else:
            kind = "mixed"
        floor, seconds, terms, span, offsets = self._compiled[kind]
        for term, weight in terms:
            seconds += weight * getattr(features, term)
        if span:
            seconds += span * _decode_span(features, self.decode_splits)
        if offsets is not None:  # a decode step: its bucket's offset
            padded = features.num_padded_tokens
            offset = offsets.get(padded)
            if offset is None:
                offset = offsets[padded] = self._nearest_offset(padded)
            seconds += offset
        return max(seconds, floor)

    def _nearest_offset(self, padded: int) -> float:
        """The offset of the nearest bucket in ``decode_offsets`` below ``padded`` (the
        smallest one's below them all)."""
        buckets = sorted(self.decode_offsets)
        below = [b for b in buckets if b <= padded]
        return self.decode_offsets[below[-1] if below else buckets[0]]

    @classmethod
    def fit(
        cls,
        samples: Iterable[tuple[StepFeatures, float]],
        compose_mixed: bool = True,
        error: str = "relative",
        match_totals: bool = False,
        decode_splits: DecodeSplits | None = None,
    ) -> LinearCostModel:
        """Fit each kind of step to ``(features, measured seconds)`` samples, minimising the
        squared ``error`` (``ERRORS``: relative or absolute; ``_fit_kind``). Needs at least as
        many decode-only steps as ``DECODE_TERMS`` and context steps as ``MIXED_TERMS``.
        Prefill steps get their own coefficients when there are at least
        ``2 * len(PREFILL_TERMS)`` of them and as many mixed steps (they launch fewer kernels:
        no decode attention), unless ``compose_mixed`` is False; otherwise mixed covers both.

        With a prefill fit, a mixed step's work is its padded rows and contexts' attention
        (prefill coefficients) plus its decodes' attention (decode coefficients); only its
        intercept and floor are fitted to the mixed steps (``_compose_mixed``). A free fit of
        all six terms to a grid's few mixed steps leans on whichever term happens to track the
        device-bound ones (one prompt a step makes context tokens and attention move together):
        on the H100 llama-8b profile it put the per-token cost at a tenth of the prefill's and
        under-predicted a real Azure run's mixed steps by 31% in total, against 8% composed
        (docs/performance.md). Serving steps are many and varied: ``Profile.cost_model`` fits
        them freely. ``decode_splits``: the decode kernel's split rule, which ``decode_span``
        reads (``engine.sim.decode_splits``; None: one split).

        ``match_totals``: then scale each kind's fit so that it predicts its samples' total
        time (``_match_totals``). The relative error's least squares predicts the typical step
        but under-predicts the mean by about twice the squared relative noise (its constant
        is sum(1/s) / sum(1/s^2)); a queue integrates the mean. On the H200 llama-1b overlap
        profile the device fit of mixed steps (14% noise a step) came out 2.5% short in total,
        and the host fit of decode steps 21% short (docs/performance.md, "Totals")."""
        by_kind: dict[str, list[tuple[StepFeatures, float]]] = {k: [] for k in STEP_KINDS}
        for features, seconds in samples:
            if seconds <= 0:
                raise ValueError(f"measured step time must be positive, got {seconds}")
            by_kind[features.kind].append((features, seconds))
        decode, prefill, mixed = (by_kind[k] for k in STEP_KINDS)
        floors: dict[str, float] = {}
        if error not in ERRORS:
            raise ValueError(f"error must be one of {ERRORS}, got {error!r}")
        splits = decode_splits  # what decode_span reads, in every fit below
        decode_fit, floors["decode"], offsets = _fit_decode(decode, error, splits)
        separate = (
            compose_mixed
            and len(prefill) >= 2 * len(PREFILL_TERMS)
            and len(mixed) >= 2 * len(MIXED_TERMS)
        )
        prefill_fit = None
        if separate:
            prefill_fit, floors["prefill"], _ = _fit_kind(prefill, PREFILL_TERMS, "prefill", error)
            mixed_fit, floors["mixed"] = _compose_mixed(prefill_fit, decode_fit, mixed, splits)
        else:
            context = prefill + mixed
            mixed_fit, floors["mixed"], _ = _fit_kind(
                context, MIXED_TERMS, "context", error, splits=splits
            )
        model = cls(
            decode=decode_fit,
            mixed=mixed_fit,
            prefill=prefill_fit,
            floors=floors,
            decode_offsets=offsets,
            decode_splits=splits,
        )
        return model._match_totals(by_kind) if match_totals else model

    def _match_totals(
        self, by_kind: Mapping[str, list[tuple[StepFeatures, float]]]
    ) -> LinearCostModel:
        """A copy whose every coefficient set (its floor and offsets with it) is scaled by its
        samples' measured total over their predicted one: the same shape, each kind's total
        matched (prefill steps count with the mixed ones where they share its fit)."""
        shared = {"prefill": "prefill" if self.prefill is not None else "mixed"}
        measured: Counter[str] = Counter()
        predicted: Counter[str] = Counter()
        for kind, samples in by_kind.items():
            fit = shared.get(kind, kind)
            for features, seconds in samples:
                measured[fit] += seconds
                predicted[fit] += self.predict(features)
        scale = {kind: measured[kind] / predicted[kind] for kind in measured if predicted[kind]}

        def scaled(kind: str, coefficients: Mapping | None) -> dict | None:
            if coefficients is None:
                return None
            return {term: weight * scale.get(kind, 1.0) for term, weight in coefficients.items()}

        return LinearCostModel(
            decode=scaled("decode", self.decode),
            mixed=scaled("mixed", self.mixed),
            prefill=scaled("prefill", self.prefill),
            floors={kind: floor * scale.get(kind, 1.0) for kind, floor in self.floors.items()},
            decode_offsets=scaled("decode", self.decode_offsets),
            decode_splits=self.decode_splits,
        )


MIN_BUCKET_STEPS = 30  # decode steps of one padded batch for it to get its own offset


def _fit_decode(
    samples: list[tuple[StepFeatures, float]], error: str, splits: DecodeSplits | None = None
) -> tuple[dict[str, float], float, dict[int, float]]:
    """The decode fit (``_fit_kind`` over ``DECODE_TERMS``), with an offset for each padded
    batch that has ``MIN_BUCKET_STEPS`` steps but the most common one (the intercept's, offset
    0), where there are at least two such: ``max(floor, line + offset)``. On the H200,
    llama-1b's decode of 33 sequences (the 48-row graph) took 19% longer than one of 32, and
    the 64-row graph less than the 48 (docs/performance.md): one line through all of them was
    10% short at 33-48 sequences."""
    counts = Counter(f.num_padded_tokens for f, _ in samples)
    chosen = sorted(b for b, n in counts.items() if n >= MIN_BUCKET_STEPS)
    if len(chosen) < 2:
        return _fit_kind(samples, DECODE_TERMS, "decode-only", error, splits=splits)
    reference = max(chosen, key=lambda b: (counts[b], -b))
    others = [b for b in chosen if b != reference]
    coefficients, floor, offsets = _fit_kind(
        samples, DECODE_TERMS, "decode-only", error, others, splits
    )
    return coefficients, floor, dict(sorted({reference: 0.0, **offsets}.items()))


def _compose_mixed(
    prefill: Mapping[str, float],
    decode: Mapping[str, float],
    samples: list[tuple[StepFeatures, float]],
    splits: DecodeSplits | None = None,
) -> tuple[dict[str, float], float]:
    """Mixed coefficients ``(intercept, the prefill's context terms, the decode's decode
    terms)`` and a floor: ``seconds = max(floor, intercept + work)``, with ``work`` fixed by the
    two fits and only ``intercept`` and ``floor`` fitted to the mixed samples (least relative
    error: a coarse search over quantiles, then each refined in closed form)."""
    coefficients = {"intercept": 0.0}
    coefficients |= {t: prefill[t] for t in PREFILL_TERMS if t != "intercept"}
    # The decodes' rows are among the padded tokens, at the prefill's per-row rate (a GEMM of
    # hundreds of rows is compute-bound); what they add is their attention over the KV.
    coefficients |= {
        t: decode[t] for t in DECODE_TERMS if t not in ("intercept", "num_decode_seqs")
    }
    coefficients["num_decode_seqs"] = 0.0
    terms = [t for t in MIXED_TERMS if t != "intercept"]
    work = np.array([_design(f, terms, splits) for f, _ in samples]) @ np.array(
        [coefficients[t] for t in terms]
    )
    seconds = np.array([s for _, s in samples])
    quantiles = np.linspace(0, 1, 41)
    intercepts = np.unique(np.maximum(np.quantile(seconds - work, quantiles), 0.0))
    floors = np.unique(np.concatenate([[0.0], np.quantile(seconds, quantiles)]))
    predicted = np.maximum(floors[:, None, None], intercepts[None, :, None] + work)
    errors = np.mean(((predicted - seconds) / seconds) ** 2, axis=2)
    i, j = np.unravel_index(np.argmin(errors), errors.shape)
    floor, intercept = float(floors[i]), float(intercepts[j])
    weights = 1.0 / seconds**2
    for _ in range(3):  # each in closed form over the samples it decides
        covered = intercept + work <= floor
        if (~covered).any():
            intercept = max(0.0, float(np.sum(((seconds - work) * weights)[~covered])
                                       / np.sum(weights[~covered])))  # fmt: skip
        covered = intercept + work <= floor
        if covered.any():
            floor = _best_constant(seconds[covered])
    coefficients["intercept"] = intercept
    return {t: coefficients[t] for t in MIXED_TERMS}, floor


def _fit_kind(
    samples: list[tuple[StepFeatures, float]],
    terms: Sequence[str],
    kind: str,
    error_kind: str = "relative",
    buckets: Sequence[int] = (),
    splits: DecodeSplits | None = None,
) -> tuple[dict[str, float], float, dict[int, float]]:
    """(coefficients, floor, offsets) of ``max(floor, linear + offset)`` with the least mean
    squared relative error: no floor and a line through every sample, or a floor at one of
    the measured times' quantiles with the line fitted to the samples above it (then the floor
    moved to the value that fits the samples it covers best). ``buckets``: padded batches
    (``num_padded_tokens``) whose steps get an offset each, of either sign (others: none)."""
    if len(samples) < len(terms):
        raise ValueError(
            f"a profile needs at least {len(terms)} {kind} steps to fit {list(terms)}; "
            f"it has {len(samples)}"
        )
    design = np.array(
        [_design(f, terms, splits) + [float(f.num_padded_tokens == b) for b in buckets]
         for f, _ in samples]
    )  # fmt: skip
    seconds = np.array([s for _, s in samples])
    weights = _weights(seconds, error_kind)
    free = len(buckets)

    def error(coefficients: np.ndarray, floor: float) -> float:
        predicted = np.maximum(design @ coefficients, floor)
        return float(np.mean(weights * (predicted - seconds) ** 2))

    best = _least_squares(design, seconds, weights, free)
    best_floor, best_error = 0.0, error(best, 0.0)
    for floor in np.unique(np.quantile(seconds, np.linspace(0.05, 0.9, 18))):
        above = seconds > floor
        if above.sum() < len(terms) + free:
            continue
        coefficients = _least_squares(design[above], seconds[above], weights[above], free)
        covered = design @ coefficients <= floor
        if covered.any():  # the floor that minimises the error of those it covers
            floor = _best_constant(seconds[covered], weights[covered])
        candidate = error(coefficients, floor)
        if candidate < best_error:
            best, best_floor, best_error = coefficients, float(floor), candidate
    fitted = {term: float(value) for term, value in zip(terms, best, strict=False)}
    offsets = {b: float(v) for b, v in zip(buckets, best[len(terms) :], strict=True)}
    return fitted, best_floor, offsets


def _weights(seconds: np.ndarray, error: str) -> np.ndarray:
    """Each sample's weight on its squared error: ``relative`` 1 / s^2 (a 1 ms step and a
    100 ms step count alike), ``absolute`` 1 (each counts by its time)."""
    return 1.0 / seconds**2 if error == "relative" else np.ones_like(seconds)


def _best_constant(seconds: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The constant c with the least sum of w (c - s)^2: sum(w s) / sum(w); by default the
    relative error's w = 1 / s^2."""
    weights = 1.0 / seconds**2 if weights is None else weights
    return float((weights * seconds).sum() / weights.sum())


def _least_squares(
    design: np.ndarray, seconds: np.ndarray, weights: np.ndarray | None = None, free: int = 0
) -> np.ndarray:
    # Weighted least squares: each row scaled by sqrt(its weight) (1 / its time for the
    # relative error, the default). Columns are scaled to unit norm for conditioning, then
    # scaled back.
    root = 1.0 / seconds if weights is None else np.sqrt(weights)
    weighted = design * root[:, None]
    norms = np.linalg.norm(weighted, axis=0)
    norms[norms == 0] = 1.0
    # A term that is the same in every sample (every mixed step of a profile has one context
    # sequence, say) cannot be told from the intercept (column 0): least squares would split
    # the intercept between them, and a step with two context sequences would pay it twice.
    # It gets no coefficient; the intercept carries it.
    constant = np.all(design == design[0], axis=0)
    active = [j for j in range(design.shape[1]) if j == 0 or not constant[j]]
    # No term may cost negative time (noise or collinear terms can push a least-squares
    # coefficient below zero, and a large batch would then be predicted to take no time): drop
    # the most negative term and refit until none is left (a simple non-negative least squares).
    # The last ``free`` columns are offsets, not costs: they may be negative.
    num_costs = design.shape[1] - free
    while True:
        solution, *_ = np.linalg.lstsq(
            weighted[:, active] / norms[active], seconds * root, rcond=None
        )
        coefficients = solution / norms[active]
        costs = [i for i, j in enumerate(active) if j < num_costs]
        worst = min(costs, key=lambda i: coefficients[i])
        if coefficients[worst] >= 0 or len(costs) == 1:
            break
        del active[worst]
    fitted = np.zeros(design.shape[1])
    fitted[active] = coefficients
    fitted[:num_costs] = np.maximum(fitted[:num_costs], 0.0)
    return fitted
