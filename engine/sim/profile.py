"""A profile: step times of the real engine over a grid of batch shapes, for one (device, model).

Written by ``python -m engine.sim.profiler`` and read by the simulated engine, which fits a
``LinearCostModel`` to it. One JSON file::

    {"format": 1, "model": "llama-8b", "device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16",
     "command": "...", "created": "...", "software": {"torch": ..., ...},
     "engine": {"max_batch_size": 256, "max_num_tokens": 8192, "tokens_per_block": 32, ...},
     "memory": {"total_bytes": ..., "weight_bytes": ..., "kv_bytes_per_token": ...,
                "free_bytes_for_kv": ...},      # what free_gpu_memory_fraction applies to
     "steps": [{"kind": "decode", "num_context_seqs": 0, ..., "decode_kv_tokens": 65536,
                "seconds": 0.0109, "host_seconds": 0.0021}, ...]}

``host_seconds`` (optional: the profiler writes it since 2026-11-28, after the committed H100
profiles were made) is the step's host time until its kernels were queued
(``IterationStats.forward_enqueue_time``): where it is close to ``seconds`` the step was bound by
the host, not the device. Only the host pipeline's fit (below) uses it.

Serving steps of overlap runs also carry ``host_time`` and ``device_time`` (the run's
``IterationStats`` columns; calibrated since 2026-11-28): where every step the fit uses has both,
the cost model fits them apart and predicts their max (``HostDeviceCostModel``), so that a run can
be simulated on a faster or slower host (``cost_model(host_time_scale=...)``). Their
``host_seconds`` is then fitted too: the launches, the part of the host's time that runs beside
the device's (the simulated engine's host pipeline, ``LLM(sim_host_pipeline=True)``).

Steps of kind ``serving`` come from real serving runs (``python -m harness.calibrate``), with
their sources in ``calibration``. Where a profile has at least ``MIN_SERVING_STEPS`` serving steps
of a kind (decode, prefill or mixed: ``StepFeatures.kind``; prefill follows mixed), the cost model
fits that kind to them alone, and to the profiler's steps otherwise: a serving step is the engine
under real load (ragged lengths, a busy pool, back-to-back steps), which the profiler's isolated
points miss by 4-17% on the H200 (docs/performance.md), and a mix of both fits neither.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from engine.sim.cost_model import (
    ERRORS,
    STEP_KINDS,
    CostModel,
    HostDeviceCostModel,
    LinearCostModel,
    StepFeatures,
)
from engine.sim.decode_splits import DecodeSplits
from engine.sim.padding import StepPadding

FORMAT_VERSION = 1
# Features a row may lack (profiles and runs made before they were recorded), with the value
# they take then: a term that is 0 in every sample gets no coefficient (cost_model).
OPTIONAL_FEATURES = {"max_decode_kv": 0, "num_padded_tokens": 0}
SERVING = "serving"  # the kind of the steps taken from real serving runs
MIN_SERVING_STEPS = 30  # of one kind, for the fit of that kind to use serving steps only
HOST_DEVICE = {"host_time", "device_time"}  # a row's split of its time (overlap serving steps)
_FEATURES = tuple(f.name for f in fields(StepFeatures))
PROFILE_DIR = Path(__file__).parent / "profiles"


@dataclass
class Profile:
    model: str
    device: str
    dtype: str
    steps: list[dict[str, float]]
    memory: dict[str, int] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    software: dict[str, str] = field(default_factory=dict)
    command: str = ""
    created: str = ""
    calibration: list[dict[str, Any]] = field(default_factory=list)  # serving steps' sources
    # What the fit minimises (LinearCostModel.fit): "relative" (every step alike) or
    # "absolute" (each by its time: the total a queue sees; harness.calibrate --fit-error)
    fit_error: str = "relative"

    @property
    def overlap_scheduler(self) -> bool | None:
        """Whether its serving steps came from runs with overlap scheduling; None: no serving
        steps (the profiler times steps alone, which fits neither mode exactly)."""
        modes = {bool(source.get("overlap_scheduler", False)) for source in self.calibration}
        return modes.pop() if len(modes) == 1 else None

    def samples(self) -> list[tuple[StepFeatures, float]]:
        # Rows made before num_padded_tokens was recorded: padded as the profile's engine pads
        # (its serving steps came from runs with the same settings).
        padding = StepPadding.of_profile(self.engine)
        samples = []
        for row in self.steps:
            features = StepFeatures(**{k: row.get(k, OPTIONAL_FEATURES.get(k)) for k in _FEATURES})
            if "num_padded_tokens" not in row:
                padded = padding.padded(features.num_tokens, features.is_decode_only)
                features = replace(features, num_padded_tokens=padded)
            samples.append((features, float(row["seconds"])))
        return samples

    def fit_samples(self) -> list[tuple[StepFeatures, float]]:
        """The samples the cost model fits: per kind of step, the serving steps where there
        are at least ``MIN_SERVING_STEPS`` of them, else the profiler's."""
        samples, _, _ = self._fit_plan()
        return samples

    @property
    def has_host_device_split(self) -> bool:
        """Whether every step the fit uses records ``host_time`` and ``device_time`` (overlap
        serving steps): the cost model is then a ``HostDeviceCostModel``."""
        return self._is_split(self._fit_plan()[2])

    def _is_split(self, rows: list[dict[str, float]]) -> bool:
        return self.overlap_scheduler is True and all(row.keys() >= HOST_DEVICE for row in rows)

    def cost_model(self, host_time_scale: float = 1.0, with_launch: bool = False) -> CostModel:
        """The fitted step-time model: a ``HostDeviceCostModel`` where the profile has the
        split (``host_time_scale``: the simulated host's time over the profiled one's;
        ``with_launch``: its ``launch`` fitted too, for the host pipeline), else a
        ``LinearCostModel`` of the steps' times (``host_time_scale`` must then be 1, and
        ``with_launch`` False)."""
        # Serving runs have few pure prefill steps, from the run's first seconds: a prefill fit
        # to them, and a mixed model composed from it, would miss the steps that matter (it put
        # llama-8b's attention cost at 6x on the H200). With serving mixed steps the context
        # fit is free, over the serving steps, prefills and all.
        samples, use_serving, rows = self._fit_plan()
        is_split = self._is_split(rows)
        splits = DecodeSplits.of_profile(self)

        def fit(times: list[float]) -> LinearCostModel:
            return LinearCostModel.fit(
                [(f, t) for (f, _), t in zip(samples, times, strict=True)],
                compose_mixed=not use_serving["mixed"],
                error=self.fit_error,
                # The split's fits predict serving steps' totals (LinearCostModel.fit): fitted
                # to the relative error alone they fell 2.5-21% short of them on the H200
                # (docs/performance.md, "Totals"). The plain loop's profiles stay as measured.
                match_totals=is_split,
                decode_splits=splits,
            )

        if is_split:
            if with_launch and not all("host_seconds" in row for row in rows):
                raise ValueError(
                    f"the {self.model} profile of {self.device} has serving steps without "
                    "host_seconds (the forward's launch time): no host pipeline from it"
                )
            return HostDeviceCostModel(
                host=fit([float(row["host_time"]) for row in rows]),
                device=fit([float(row["device_time"]) for row in rows]),
                host_time_scale=host_time_scale,
                launch=fit([float(row["host_seconds"]) for row in rows]) if with_launch else None,
            )
        if host_time_scale != 1.0 or with_launch:
            ask = "a launch fit" if host_time_scale == 1.0 else f"host_time_scale={host_time_scale}"
            raise ValueError(
                f"{ask} needs a profile whose serving steps record "
                "host_time and device_time (overlap runs calibrated since 2026-11-28, "
                f"python -m harness.calibrate); the {self.model} profile of {self.device} "
                "does not"
            )
        return fit([seconds for _, seconds in samples])

    def _fit_plan(
        self,
    ) -> tuple[list[tuple[StepFeatures, float]], dict[str, bool], list[dict[str, float]]]:
        """``fit_samples``, per kind of step whether they are the serving steps, and their
        rows."""
        samples = self.samples()
        is_serving = [row.get("kind") == SERVING for row in self.steps]
        num_serving = Counter(f.kind for (f, _), s in zip(samples, is_serving, strict=True) if s)
        use_serving = {kind: num_serving[kind] >= MIN_SERVING_STEPS for kind in STEP_KINDS}
        # With serving mixed steps, the grid's prefill steps would make the mixed fit a
        # composition of the grid's prefill rates (which miss serving contexts).
        use_serving["prefill"] |= use_serving["mixed"]
        chosen = [
            i
            for i, (sample, serving) in enumerate(zip(samples, is_serving, strict=True))
            if serving == use_serving[sample[0].kind]
        ]
        return [samples[i] for i in chosen], use_serving, [self.steps[i] for i in chosen]

    def grid_only(self) -> Profile:
        """A copy with the profiler's steps alone: its serving steps and their sources gone
        (to calibrate afresh, ``harness.calibrate --from-grid``)."""
        steps = [row for row in self.steps if row.get("kind") != SERVING]
        return replace(self, steps=steps, calibration=[])

    def with_serving_steps(self, rows: list[dict[str, float]], source: dict[str, Any]) -> Profile:
        """A copy with ``rows`` (features, ``seconds``, optional ``host_seconds``, ``host_time``
        and ``device_time``) added as serving steps, and ``source`` (where they came from) in
        ``calibration``."""
        steps = [{"kind": SERVING, **row} for row in rows]
        return replace(self, steps=[*self.steps, *steps], calibration=[*self.calibration, source])

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": FORMAT_VERSION, **asdict(self)}
        path.write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a profile; a missing file, bad JSON or a missing field is a ``ValueError``
        naming the file (and the field, or the step index)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such profile file")
        data = read_json_object(path, "a profile")
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: format {data.get('format')!r}, expected {FORMAT_VERSION}")
        for key in ("model", "device", "dtype", "steps"):
            if key not in data:
                raise ValueError(f"{path}: missing field {key!r}")
        for i, row in enumerate(data["steps"]):
            missing = [
                k for k in (*_FEATURES, "seconds") if k not in row and k not in OPTIONAL_FEATURES
            ]
            if missing:
                raise ValueError(f"{path}: steps[{i}] has no {', '.join(missing)}")
            if not row["seconds"] > 0:
                raise ValueError(f"{path}: steps[{i}].seconds must be > 0, got {row['seconds']}")
        if data.get("fit_error", "relative") not in ERRORS:
            raise ValueError(
                f"{path}: fit_error must be one of {ERRORS}, got {data['fit_error']!r}"
            )
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def default_profile_path(
    model: str, device: str, overlap: bool = False, full_graphs: bool = False
) -> Path:
    """``engine/sim/profiles/<device>/<model>.json`` (device: a short name such as ``h100``),
    calibrated on runs without overlap scheduling; ``<model>.overlap.json`` with it (a step's
    time is then the longer of its host and device times, ``harness.calibrate``);
    ``<model>.full.overlap.json`` of an engine with full CUDA graphs (``full_graphs``)."""
    return (
        PROFILE_DIR
        / device
        / f"{model}{'.full' if full_graphs else ''}{'.overlap' if overlap else ''}.json"
    )


def available_profiles() -> list[str]:
    """The committed profiles, as ``<device>/<name>`` (not the host speeds and power caps
    beside them)."""
    paths = PROFILE_DIR.glob("*/*.json")
    return sorted(
        f"{p.parent.name}/{p.stem}" for p in paths if not p.name.endswith((HOST_SPEEDS, POWER))
    )


# Files beside a profile: engine.sim.host_speeds's <profile stem>.host_speeds.json, and
# engine.sim.power's <profile stem>.power.json (which a simulation with that profile uses).
HOST_SPEEDS = ".host_speeds.json"
POWER = ".power.json"


def power_path(profile_path: str | Path) -> Path:
    """Where the power cap fitted with the profile at ``profile_path`` lies beside it."""
    path = Path(profile_path)
    return path.with_name(path.name.removesuffix(".json") + POWER)


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; a ``ValueError`` naming the file if it is not one."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {what} is a JSON object, not {type(data).__name__}")
    return data
