"""Calibrate a simulator profile with the steps of real serving runs.

    python -m harness.calibrate REAL [REAL ...] --profile P --out P2 [--max-steps 1000]
    python -m harness.calibrate REAL [REAL ...] --profile P --host-timeline DIR
    python -m harness.calibrate REAL [REAL ...] --profile P --host-speeds FILE
    python -m harness.calibrate REAL [REAL ...] --profile P --power FILE

REAL: run or sweep directories of the real engine (``harness.results.load``) on the GPU and model
that ``P`` profiles. Every step of a run that ran a batch carries the counts the cost model reads
(``iterations.parquet``: context sequences, tokens and attention pairs, decode sequences and KV
tokens) and its measured time, so it is a sample the cost model can fit as it is. ``P2`` is ``P``
with those steps added as ``serving`` steps (at most ``--max-steps`` of each kind a run, evenly
spread over the run) and their sources under ``calibration``; the cost model then fits each kind
of step to the serving steps where it has enough of them (``engine.sim.profile.MIN_SERVING_STEPS``).

Runs with overlap scheduling (``executor.overlap_scheduler=true``) are calibrated to what a step
holds the pipeline for, ``max(host_time, device_time)`` (``IterationStats``): the host prepares
step n+1 while the device runs step n, so the time between two reads is the longer of step n's
device time and step n+1's host time, one step's work charged to another's row. The profile
records which mode its serving steps came from; calibrate a profile with runs of one mode, and
simulate that mode with it.

Why: the profiler times each batch shape alone, from an idle GPU, on sequences of one length. A
serving step also carries ragged lengths, a pool that has been in use for minutes and steps back
to back; on the H200 the same counts took 4-17% longer in serving runs than in the profile. A fit
to one workload's serving steps predicted another workload's to within a few percent in total
(docs/performance.md). Check a calibrated profile on runs it was not calibrated with.

Prints, per kind of step, how far the profile's cost model was from the runs' measured time
before and after (``bias``: predicted total / measured total - 1). Overlap runs on a GPU record
each step's host and device times apart; the profile keeps both, its cost model fits them apart
(``engine.sim.HostDeviceCostModel``), and the command also prints each run's host time over the
calibrated host model: the ``executor.sim_host_time_scale`` that simulates that run's host (the
lent H200 hosts ran the same steps 1.9x apart from one machine or minute to another).

Those hosts switch between a fast and a slow speed within a run, for seconds at a time
(``engine.sim.host_timeline``). ``--host-timeline DIR`` writes each run's host speed second by
second (``host_timeline-<i>.csv``, against the calibrated profile, or ``P`` without ``--out``);
``executor.sim_host_timeline=FILE`` replays it in a simulation of that run's workload, which
then separates the cost model's error from the host's. ``--host-speeds FILE`` fits the two
speeds and how long each lasts to all the runs' timelines (``engine.sim.HostSpeeds``);
``executor.sim_host_speeds=FILE`` simulates any workload on such a host, drawn with the run's
seed.

The GPU's own speed moves too: at its power cap it lowers its clock, and the same step takes
longer after heavy work than after light work (``engine.sim.power``). ``--power FILE`` fits
that to the runs' device-bound steps (``engine.sim.PowerCap``); a simulation uses the file
beside its profile, ``<profile>.power.json``, by default (``executor.sim_power``).

Calibrate the steps with prompt tokens on runs of one clock. A fit to runs at two clocks
(llama-8b's ``fcfs_vs_maxutil`` near 1,950 MHz, its long-prompt workloads at the 700 W cap near
1,600 MHz) lets a feature that differs between the workloads stand in for the clock: the
committed llama-8b profile once charged each decode of a mixed step for it, and
under-predicted mixed steps of 17-128 decodes by 5-8% on every long-prompt workload. So the
H200 llama-8b profile is calibrated in two passes, ``--kinds decode`` for the fast-clock runs
and every kind for the capped ones, and the power cap fitted over all of them then models the
fast clock: on steps with prompt tokens (``--power-steps``, by default), saturating at the
cap's clock, averaged over ``--power-tau`` seconds (engine/sim/profiles/README.md)::

    python -m harness.calibrate FAST... --profile P --from-grid --kinds decode --out P2
    python -m harness.calibrate CAPPED... --profile P2 --out P2
    python -m harness.calibrate FAST... CAPPED... --profile P2 --power P2.power.json --power-tau 2
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from engine.sim.cost_model import ERRORS, STEP_KINDS, HostDeviceCostModel, StepFeatures
from engine.sim.host_speeds import SLOW_THRESHOLD, HostSpeeds
from engine.sim.host_timeline import HostTimeline
from engine.sim.padding import StepPadding
from engine.sim.power import TAUS_S, PowerCap, RunSteps
from engine.sim.profile import Profile
from harness.config import graph_settings
from harness.results import RunResult, load

log = logging.getLogger(__name__)

HOST_SPREAD = 1.25  # runs whose host scales differ by more are flagged: one fit blends them
TIMELINE_BIN_SECONDS = 1.0  # a host timeline's resolution: a few mixed steps a second or more
# A step whose host time is under this share of its device time is the device's alone: the
# device never waited for the host's launches (the device-time scale is measured on those).
DEVICE_BOUND = 0.5
FEATURE_COLUMNS = {  # StepFeatures field -> iterations.parquet column
    "num_context_seqs": "num_context_requests",
    "num_context_tokens": "num_context_tokens",
    "context_attention": "context_attention",
    "num_decode_seqs": "num_generation_requests",
    "decode_kv_tokens": "decode_kv_tokens",
    "max_decode_kv": "max_decode_kv",  # recorded since 2026-11-28 (0 in older runs)
    "num_padded_tokens": "num_padded_tokens",  # recorded since 2026-11-28 (else run_padding)
}


def runs_under(path: str | Path) -> list[RunResult]:
    result = load(path)
    return [result] if isinstance(result, RunResult) else list(result.runs)


def is_overlap_run(run: RunResult) -> bool:
    return bool((run.config.get("executor") or {}).get("overlap_scheduler", False))


def is_simulated(run: RunResult) -> bool:
    return run.info.get("engine", "torch") == "sim"


def run_padding(run: RunResult) -> StepPadding:
    """The graph buckets a real run's engine padded its steps to, from its config: for runs
    made before ``num_padded_tokens`` was recorded (their engine ran on CUDA with Triton
    attention, where ``LLM`` captures graphs unless told not to)."""
    config = run.config
    if run.info.get("hardware") == "cpu":  # eager
        return StepPadding()
    microbatch = config.get("microbatch_scheduler") or {}
    return StepPadding.of_engine(
        max_batch_size=microbatch.get("max_batch_size"),
        max_num_tokens=microbatch.get("max_num_tokens"),
        **graph_settings(config.get("executor") or {}),
    )


def serving_steps(run: RunResult, model: str) -> pd.DataFrame:
    """The steps of ``run`` that ran a batch: the ``StepFeatures`` columns, ``kind``,
    ``seconds`` (the step's wall time; with overlap, the longer of its host and device times)
    and ``host_seconds`` (its host time until the forward's kernels were queued). Raises
    ``ValueError`` naming the run when it is not of ``model`` or predates the recorded work
    columns."""
    run_model = (run.config.get("model") or {}).get("name") or run.info.get("model")
    if run_model is not None and run_model != model:
        raise ValueError(f"{run.path}: a run of model {run_model!r}, not {model!r}")
    steps = run.iterations
    if "decode_kv_tokens" not in steps:
        raise ValueError(
            f"{run.path}: iterations.parquet has no decode_kv_tokens column (recorded since "
            "2026-11-28); run the real engine again"
        )
    # A simulated step's latency is its predicted time, in either mode.
    overlap = is_overlap_run(run) and not is_simulated(run)
    if overlap and "host_time" not in steps:
        raise ValueError(
            f"{run.path}: an overlap run without host_time / device_time columns (recorded "
            "since 2026-11-28); run the real engine again"
        )
    steps = steps[(steps.num_context_tokens > 0) | (steps.num_generation_requests > 0)]
    columns = {field: steps.get(column, 0) for field, column in FEATURE_COLUMNS.items()}
    frame = pd.DataFrame(columns, index=steps.index)
    has_context, has_decodes = frame.num_context_tokens > 0, frame.num_decode_seqs > 0
    if "num_padded_tokens" not in steps:
        padding = run_padding(run)
        frame["num_padded_tokens"] = [
            padding.padded(int(n), is_decode_only=not context)
            for n, context in zip(
                frame.num_context_tokens + frame.num_decode_seqs, has_context, strict=True
            )
        ]
    frame["kind"] = np.select([~has_context, ~has_decodes], ["decode", "prefill"], "mixed")
    # fmax: device_time is NaN off CUDA, where the host's time holds everything
    seconds = np.fmax(steps.host_time, steps.device_time) if overlap else steps.step_latency
    frame["seconds"] = seconds
    frame["host_seconds"] = steps.get("forward_enqueue_time", 0.0)
    frame["time"] = steps.time  # the step's start on the run's clock (not a profile column)
    if overlap:  # what a HostDeviceCostModel fits apart (device_time NaN off CUDA: no split)
        frame["host_time"] = steps.host_time
        frame["device_time"] = steps.device_time
    return frame.reset_index(drop=True)


def features(frame: pd.DataFrame) -> list[StepFeatures]:
    return [
        StepFeatures(
            num_context_seqs=int(row.num_context_seqs),
            num_context_tokens=int(row.num_context_tokens),
            context_attention=float(row.context_attention),
            num_decode_seqs=int(row.num_decode_seqs),
            decode_kv_tokens=int(row.decode_kv_tokens),
            max_decode_kv=int(row.max_decode_kv),
            num_padded_tokens=int(row.num_padded_tokens),
        )
        for row in frame.itertuples()
    ]


def check_real_run(run: RunResult, profile: Profile) -> None:
    """A run of the real engine on the profile's GPU; raises ``ValueError`` naming the run."""
    if run.status != "ok":
        raise ValueError(f"{run.path}: the run failed ({run.info.get('error')})")
    if is_simulated(run):
        raise ValueError(f"{run.path}: a simulated run; calibrate with runs of the real engine")
    hardware = run.info.get("hardware")
    if hardware is None:
        log.warning("%s does not name its GPU (runs before 2026-11-28): not checked", run.path)
    elif hardware != profile.device:
        raise ValueError(
            f"{run.path}: a run on {hardware!r}, but the profile is of {profile.device!r}"
        )


def sample_steps(steps: pd.DataFrame, max_steps: int) -> pd.DataFrame:
    """At most ``max_steps`` steps of each kind, evenly spread over the run (every phase of its
    load), in run order. Per kind: a serving run has ~20 decode steps for each mixed one, and
    the mixed fit needs its own samples."""
    keep = []
    for _, group in steps.groupby("kind"):
        picks = np.linspace(0, len(group) - 1, min(max_steps, len(group))).round().astype(int)
        keep += group.index[np.unique(picks)].tolist()
    return steps.loc[sorted(keep)]


def calibrate(
    profile: Profile,
    runs: list[RunResult],
    max_steps: int = 1000,
    fit_error: str | None = None,
    kinds: tuple[str, ...] = STEP_KINDS,
    from_grid: bool = False,
) -> tuple[Profile, pd.DataFrame]:
    """``profile`` with the serving steps of ``runs`` (see the module doc), and every one of
    those steps (``serving_steps``, all runs). ``fit_error``: what its fit minimises
    (``Profile.fit_error``; None keeps the profile's). ``kinds``: the kinds of step added (the
    others' fits stay as they were), e.g. ``("decode",)`` for a workload whose decode steps the
    profile has not seen (small batches of long sequences) on a host that would skew the mixed
    fit's host time. ``from_grid``: drop the profile's own serving steps first (a fresh
    calibration on the profiler's grid)."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if not kinds or set(kinds) - set(STEP_KINDS):
        raise ValueError(f"kinds must be some of {STEP_KINDS}, got {kinds}")
    if fit_error is not None:
        profile = replace(profile, fit_error=fit_error)
    if from_grid:
        profile = profile.grid_only()
    tables = []
    modes = {is_overlap_run(run) for run in runs} | {
        source.get("overlap_scheduler", False) for source in profile.calibration
    }
    if len(modes) > 1:
        raise ValueError(
            "runs with and without overlap scheduling (the profile's own serving steps "
            "included): their step times mean different things; calibrate with one mode"
        )
    for run in runs:
        check_real_run(run, profile)
        steps = serving_steps(run, profile.model)
        if steps.empty:
            raise ValueError(f"{run.path}: no step ran a batch")
        rows = [
            {k: v for k, v in row.items() if v == v}  # NaN (no device_time): not recorded
            for row in sample_steps(steps[steps.kind.isin(kinds)], max_steps)
            .drop(columns=["kind", "time"])
            .to_dict("records")
        ]
        if not rows:
            raise ValueError(f"{run.path}: no step of the kinds {kinds}")
        source = {
            "run": str(run.path),
            "variant": run.info.get("variant"),
            "workload": run.info.get("workload"),
            "hardware": run.info.get("hardware"),
            "num_steps": len(steps),
            "num_used": len(rows),
            "overlap_scheduler": is_overlap_run(run),
            "kinds": list(kinds),
        }
        profile = profile.with_serving_steps(rows, source)
        tables.append(steps.assign(run=str(run.path)))  # the run: not a column of its rows
    return profile, pd.concat(tables, ignore_index=True)


def bias_table(before: Profile, after: Profile, steps: pd.DataFrame) -> pd.DataFrame:
    """Per kind of ``steps`` (``serving_steps`` rows): how many, measured seconds, and each
    profile's predicted total against it."""
    steps = steps.copy()
    batch = features(steps)
    rows = []
    for name, profile in (("before", before), ("after", after)):
        model = profile.cost_model()
        steps[name] = [model.predict(f) for f in batch]
    for kind, group in steps.groupby("kind"):
        measured = group.seconds.sum()
        rows.append(
            {
                "kind": kind,
                "steps": len(group),
                "measured_s": round(measured, 3),
                "bias_before": f"{100 * (group.before.sum() / measured - 1):+.1f}%",
                "bias_after": f"{100 * (group.after.sum() / measured - 1):+.1f}%",
            }
        )
    return pd.DataFrame(rows)


def host_ratios(model: HostDeviceCostModel, steps: pd.DataFrame) -> pd.DataFrame:
    """The ``steps`` (``calibrate``'s table) that record a host time, each with its ``ratio``:
    that time over ``model``'s host fit."""
    steps = steps.dropna(subset=["host_time"])
    predicted = np.array([model.host.predict(f) for f in features(steps)])
    return steps.assign(ratio=steps.host_time.to_numpy() / predicted)


def host_bound_candidates(run_steps: pd.DataFrame) -> pd.DataFrame:
    """One run's steps with prompt tokens, where the host can hold the pipeline (all of them if
    it has none): what its host scales are measured on."""
    context = run_steps[run_steps.kind != "decode"]
    return context if len(context) else run_steps


def host_time_table(profile: Profile, steps: pd.DataFrame) -> pd.DataFrame | None:
    """Per run of ``steps`` (``calibrate``'s table): its host time over the profile's host
    model (``HostDeviceCostModel``), the median over its steps with prompt tokens (where the
    host can hold the pipeline; all its steps if it has none): the
    ``executor.sim_host_time_scale`` that simulates its host; and its device time over the
    device model's, in total (a queue adds them up) over its steps whose host took less than
    ``DEVICE_BOUND`` of their device time (all its steps with a device time if none did): the
    ``executor.sim_device_time_scale`` of its GPU. A step whose host is near its device time
    has the device wait for the host's kernel launches (docs/performance.md, "A host of two
    speeds"): its device time is partly the host's. None: no split model."""
    model = profile.cost_model()
    if not isinstance(model, HostDeviceCostModel) or "host_time" not in steps:
        return None
    steps = host_ratios(model, steps)
    steps = steps.assign(device_predicted=[model.device.predict(f) for f in features(steps)])
    rows = []
    for run, group in steps.groupby("run", sort=False):
        chosen = host_bound_candidates(group)
        timed = group.dropna(subset=["device_time"]) if "device_time" in group else group[:0]
        bound = timed.host_time < DEVICE_BOUND * timed.device_time
        if bound.any():
            timed = timed[bound]
        device = timed.device_time.sum() / timed.device_predicted.sum() if len(timed) else np.nan
        rows.append(
            {
                "run": run,
                "steps": len(chosen),
                "host_time_scale": float(chosen.ratio.median()),
                "device_time_scale": float(device),
            }
        )
    return pd.DataFrame(rows)


def power_runs(profile: Profile, steps: pd.DataFrame) -> list[RunSteps]:
    """Each run's steps (``calibrate``'s table) as ``PowerCap.fit`` takes them, against the
    profile's device model: the runs with device times (on CUDA); [] where the profile has no
    device model (no host and device split)."""
    model = profile.cost_model()
    if not isinstance(model, HostDeviceCostModel) or "device_time" not in steps:
        return []
    steps = steps.assign(device_predicted=[model.device.predict(f) for f in features(steps)])
    runs = []
    for _, group in steps.groupby("run", sort=False):
        group = group.sort_values("time", kind="stable")
        device = group.device_time.to_numpy(dtype=float)
        timed = np.isfinite(device)
        if not timed.any():  # off CUDA: no device time
            continue
        runs.append(
            RunSteps(
                start=group.time.to_numpy(dtype=float),
                seconds=group.seconds.to_numpy(dtype=float),
                rows=group.num_padded_tokens.to_numpy(dtype=float),
                measured=np.where(timed, device, 0.0),
                predicted=group.device_predicted.to_numpy(dtype=float),
                is_fitted=timed & (group.host_time.to_numpy() < DEVICE_BOUND * device),
                is_decode=(group.kind == "decode").to_numpy(),
            )
        )
    return runs


def host_timelines(
    profile: Profile, steps: pd.DataFrame, bin_seconds: float = TIMELINE_BIN_SECONDS
) -> dict[str, HostTimeline]:
    """Per run of ``steps`` (``calibrate``'s table), its host's speed over time: each step's
    host time over the profile's host model, the median over each ``bin_seconds`` of the
    steps with prompt tokens (all its steps if it has none; ``host_time_table``'s choice).
    Raises ``ValueError`` without a host/device split."""
    model = profile.cost_model()
    if not isinstance(model, HostDeviceCostModel) or "host_time" not in steps:
        raise ValueError(
            "a host timeline needs overlap runs with host_time and a profile that fits the "
            "host apart (HostDeviceCostModel)"
        )
    timelines = {}
    for run, group in host_ratios(model, steps).groupby("run", sort=False):
        chosen = host_bound_candidates(group)
        timelines[run] = HostTimeline.of_samples(chosen.time, chosen.ratio, bin_seconds)
    return timelines


def write_host_timelines(timelines: dict[str, HostTimeline], out: Path) -> pd.DataFrame:
    """One CSV per run under ``out`` (``host_timeline-<i>.csv``, in the runs' order); returns
    which run went where, and each timeline's median scale."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (run, timeline) in enumerate(timelines.items()):
        path = out / f"host_timeline-{i}.csv"
        timeline.save(path)
        scales = np.array(timeline.scales)
        rows.append(
            {
                "run": run,
                "file": str(path),
                "median": float(np.median(scales)),
                "slow_share": float(np.mean(scales > SLOW_THRESHOLD)),
            }
        )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.calibrate",
        description="Add the steps of real serving runs to a simulator profile, and/or write "
        "each run's host speed over time.",
    )
    parser.add_argument("real", nargs="+", help="run or sweep directories of the real engine")
    parser.add_argument("--profile", required=True, help="the profile to calibrate")
    parser.add_argument(
        "--out", default=None, help="where to write the calibrated profile (none: no profile)"
    )
    parser.add_argument(
        "--max-steps", type=int, default=1000, help="serving steps kept of each kind, a run"
    )
    parser.add_argument(
        "--fit-error",
        choices=ERRORS,
        default=None,
        help="what the fit minimises: relative (every step alike) or absolute (each by its "
        "time, the total a queue sees); default: the profile's (relative)",
    )
    parser.add_argument(
        "--kinds",
        default=None,
        metavar="KIND,...",
        help=f"add only these kinds of step ({','.join(STEP_KINDS)}; default: all); the "
        "others' fits stay as they were",
    )
    parser.add_argument(
        "--from-grid",
        action="store_true",
        help="drop --profile's serving steps first: calibrate its profiler grid afresh",
    )
    parser.add_argument(
        "--host-timeline",
        metavar="DIR",
        default=None,
        help="write each run's host speed over time to DIR, against the calibrated profile "
        "(without --out: against --profile); executor.sim_host_timeline replays one in a "
        "simulation of the same workload",
    )
    parser.add_argument(
        "--host-speeds",
        metavar="FILE",
        default=None,
        help="fit a host of two speeds to the runs' timelines and write it to FILE (JSON); "
        "executor.sim_host_speeds=FILE simulates on such a host",
    )
    parser.add_argument(
        "--power",
        metavar="FILE",
        default=None,
        help="fit the GPU's power cap (its device time after heavy work, engine.sim.PowerCap) "
        "to the runs' steps and write it to FILE (JSON); a simulation uses "
        "<profile>.power.json by default, or executor.sim_power=FILE",
    )
    parser.add_argument(
        "--power-steps",
        choices=("prompt", "all"),
        default="prompt",
        help="--power: the steps the cap slows, those with prompt tokens (default: decode-only "
        "steps read memory and barely follow the clock) or all",
    )
    parser.add_argument(
        "--power-tau",
        type=float,
        default=None,
        metavar="S",
        help="--power: the rate's averaging time in seconds (default: the fit's best of "
        f"{', '.join(map(str, TAUS_S))})",
    )
    args = parser.parse_args(argv)
    if all(getattr(args, a) is None for a in ("out", "host_timeline", "host_speeds", "power")):
        parser.error(
            "nothing to write: give --out (a calibrated profile), --host-timeline, "
            "--host-speeds and/or --power"
        )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        profile = Profile.load(args.profile)
        runs = [run for path in args.real for run in runs_under(path)]  # each read once
        kinds = tuple(args.kinds.split(",")) if args.kinds else STEP_KINDS
        calibrated, steps = calibrate(
            profile, runs, args.max_steps, args.fit_error, kinds, args.from_grid
        )
        # Host scales are against the profile a simulation will use: the calibrated one.
        target = profile if args.out is None else calibrated
        table = None if args.out is None else bias_table(profile, calibrated, steps)
        hosts = host_time_table(target, steps)
        timelines = None
        if args.host_timeline is not None or args.host_speeds is not None:
            timelines = host_timelines(target, steps)
        speeds = None if args.host_speeds is None else HostSpeeds.fit(list(timelines.values()))
        power = power_steps = None
        if args.power is not None:
            power_steps = power_runs(target, steps)
            if not power_steps:
                raise ValueError(
                    "--power needs overlap runs on a GPU (device times) and a profile with "
                    "host and device times apart"
                )
            taus = TAUS_S if args.power_tau is None else (args.power_tau,)
            power = PowerCap.fit(power_steps, taus, scales_decode=args.power_steps == "all")
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    which = "--profile's" if args.out is None else "the calibrated profile's"
    if table is not None:
        calibrated.save(args.out)
        print(table.to_string(index=False))
    if hosts is not None:
        print(
            f"\nhost and device times of each run over {which} (executor.sim_host_time_scale and "
            "sim_device_time_scale simulate them; hosts far apart blur the fit):"
        )
        print(hosts.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        low, high = hosts.host_time_scale.min(), hosts.host_time_scale.max()
        if table is not None and high > HOST_SPREAD * low:
            print(
                f"warning: these runs' hosts differ by {high / low:.2f}x ({low:.3g} to "
                f"{high:.3g}): the fitted host time is a blend of them. Calibrate with runs of "
                "one host speed and simulate the others with executor.sim_host_time_scale."
            )
    if speeds is not None:
        measured = {
            "command": " ".join(["python -m harness.calibrate", *(argv or sys.argv[1:])]),
            "profile": args.profile if args.out is None else args.out,
            "runs": list(timelines),
            "slow_threshold": SLOW_THRESHOLD,
        }
        speeds.save(args.host_speeds, measured)
        print(
            f"\nthe runs' host, two speeds against {which} host model: fast "
            f"{speeds.fast_scale:.3g}x for {speeds.mean_fast_s:.3g} s on average, slow "
            f"{speeds.slow_scale:.3g}x for {speeds.mean_slow_s:.3g} s (slow "
            f"{speeds.slow_share:.0%} of the time, {speeds.mean_scale:.3g}x on average); wrote "
            f"{args.host_speeds} (executor.sim_host_speeds=FILE simulates on it)"
        )
    if power is not None:
        explained = power.explained(power_steps)
        measured = {
            "command": " ".join(["python -m harness.calibrate", *(argv or sys.argv[1:])]),
            "profile": args.profile if args.out is None else args.out,
            "runs": [str(run.path) for run in runs],
            "explained": round(explained, 4),
        }
        power.save(args.power, measured)
        print(
            f"\nthe GPU's power cap against {which} device model: its device time x "
            f"{power.base:.4g} + {power.slope:.3g} per row/s over {power.threshold:.4g} rows/s"
            + (f" up to {power.saturation:.4g}" if math.isfinite(power.saturation) else "")
            + (", steps with prompt tokens only" if not power.scales_decode else "")
            + f", the rows/s averaged over {power.tau_s:g} s; it explains {explained:.1%} of the "
            f"steps' spread about the fit; wrote {args.power} (a simulation with that profile "
            "uses <profile>.power.json, or executor.sim_power=FILE)"
        )
    if timelines is not None and args.host_timeline is not None:
        written = write_host_timelines(timelines, Path(args.host_timeline))
        print(
            f"\neach run's host over time against {which} host model, a scale each "
            f"{TIMELINE_BIN_SECONDS:g} s (executor.sim_host_timeline=FILE replays it; "
            f"slow_share: the share of them over {SLOW_THRESHOLD:g}):"
        )
        print(written.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if table is not None:
        start = profile.grid_only() if args.from_grid else profile
        num_added = len(calibrated.steps) - len(start.steps)
        dropped = " (its serving steps dropped: --from-grid)" if args.from_grid else ""
        print(f"\nwrote {args.out}: {num_added} serving steps added to {len(start.steps)}{dropped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
