"""Replay real runs in the simulator on their own host and GPU: the cost model's own error.

    python bench/sim_replay.py REAL [REAL ...] --out DIR [--profile P] [--set KEY=VALUE ...]
    python bench/sim_replay.py REAL [REAL ...] --out DIR --default-only   # the first way alone

REAL: run or sweep directories of the real engine with overlap scheduling (each run's
``.hydra/overrides.yaml`` names its workload). For each run, ``harness.calibrate`` measures its
host second by second (``--host-timeline``) and its GPU's device-time scale against the profile;
the same workload is then simulated three ways and compared with that run alone
(``harness.fidelity``):

    default           the profile's host and device (what a simulation knows up front)
    host timeline     executor.sim_host_timeline: the run's host replayed
    timeline, device  and executor.sim_device_time_scale: the run's GPU as well

The lent GPUs' hosts switch between two speeds within a run, and their GPUs run a percent or
two apart (docs/performance.md, "A host of two speeds"): the first row mixes the cost model's
error with those, the last is what is left of the model's own. Writes ``DIR/replay.csv`` (a row
per run and way: the issue's 7 targets met, each metric's error, and the simulation it was
compared with) and prints it; the simulations and their fidelity tables are under ``DIR/<i>/``.
The simulator is deterministic, so runs of the same workload (repeats, or the same experiment
on other days) share one default simulation, made under the first of them. The profile defaults
to the committed one of the run's model (``engine/sim/profiles/h200/<model>.overlap.json``);
``--set`` adds an override to every simulation (``--set executor.sim_host_pipeline=true``: the
host as a pipeline stage). ``--default-only`` simulates the first way alone: the default simulation
against every run given, with the targets met in total (how docs/performance.md counts "the
default simulation against every real run we have").
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from engine.sim.profile import Profile, default_profile_path  # noqa: E402
from harness.calibrate import (  # noqa: E402
    host_time_table,
    host_timelines,
    is_overlap_run,
    runs_under,
    serving_steps,
)

TARGETS = ("p50_ttft_ms", "p90_ttft_ms", "p50_tpot_ms", "p90_tpot_ms", "p50_e2el_ms",
           "p90_e2el_ms", "output_throughput")  # fmt: skip
DROPPED = ("output_root", "progress", "plots", "hydra.")  # overrides that are not the workload


def workload_overrides(run_path: Path) -> list[str]:
    """The overrides the real run was made with, less where it wrote and how it showed it; a
    run of a sweep is run alone (``hydra.mode=RUN``)."""
    overrides = yaml.safe_load((run_path / ".hydra" / "overrides.yaml").read_text()) or []
    kept = [o for o in overrides if not o.lstrip("+~").startswith(DROPPED)]
    return [*kept, "hydra.mode=RUN"]


def simulate(overrides: list[str], out: Path) -> Path:
    """Runs the harness simulated; returns its run directory."""
    command = [sys.executable, "-m", "harness", *overrides, "executor.engine=sim",
               f"output_root={out}", "progress=false", "plots=false"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    (found,) = {p.parent for p in out.rglob("requests.parquet")}
    return found


def fidelity_row(real: Path, sim: Path, out: Path) -> dict[str, float]:
    command = [sys.executable, "-m", "harness.fidelity", str(real), str(sim), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    table = pd.read_csv(out / "fidelity.csv").set_index("metric")
    targets = table.loc[list(TARGETS)]
    return {
        "within": f"{int(targets.within_target.sum())}/{len(TARGETS)}",
        **{m.removesuffix("_ms"): float(e) for m, e in targets.relative_error.items()},
    }


def replay(
    reals: list[str],
    out: Path,
    profile_path: str | None = None,
    extra: Sequence[str] = (),
    default_only: bool = False,
) -> pd.DataFrame:
    rows = []
    runs = [run for path in reals for run in runs_under(path)]
    # The simulator is deterministic: runs of one workload share their default simulation.
    simulated: dict[tuple[str, ...], Path] = {}
    for i, run in enumerate(runs):
        if not is_overlap_run(run):
            raise ValueError(f"{run.path}: not an overlap run (no host and device times apart)")
        model = (run.config.get("model") or {}).get("name") or run.info.get("model")
        path = profile_path or default_profile_path(model, "h200", True)
        here = out / str(i)
        here.mkdir(parents=True, exist_ok=True)
        overrides = [*workload_overrides(run.path), f"executor.profile={path}", *extra]
        ways: dict[str, list[str]] = {"default": []}
        device_scale = math.nan
        if not default_only:  # the run's own host and GPU, measured against the profile
            profile = Profile.load(path)
            steps = serving_steps(run, model).assign(run=str(run.path))
            scales = host_time_table(profile, steps)
            if scales is None:
                raise ValueError(f"{path}: the profile does not fit the host apart")
            device_scale = float(scales.device_time_scale.iloc[0])
            (timeline,) = host_timelines(profile, steps).values()
            timeline.save(here / "host_timeline.csv")
            replayed = f"executor.sim_host_timeline={here / 'host_timeline.csv'}"
            ways["host timeline"] = [replayed]
            if math.isfinite(device_scale):  # NaN: the run timed no device (a CPU run)
                device = f"executor.sim_device_time_scale={device_scale:.4f}"
                ways["timeline, device"] = [replayed, device]
        for j, (way, settings) in enumerate(ways.items()):
            key = (*overrides, *settings)
            if key not in simulated:
                simulated[key] = simulate(list(key), here / f"sim-{j}")
            sim = simulated[key]
            row = fidelity_row(run.path, sim, here / f"fidelity-{j}")
            run_way = {"run": str(run.path), "way": way, "device_scale": device_scale}
            rows.append({**run_way, **row, "sim": str(sim)})
    table = pd.DataFrame(rows)
    table.to_csv(out / "replay.csv", index=False)
    return table


def targets_met(table: pd.DataFrame) -> dict[str, int]:
    """Per way of ``replay``'s table, the targets met over all its runs."""
    met = table.within.str.split("/").str[0].astype(int)
    return {way: int(met[table.way == way].sum()) for way in dict.fromkeys(table.way)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/sim_replay.py", description=__doc__)
    parser.add_argument("real", nargs="+", help="run or sweep directories of the real engine")
    parser.add_argument("--out", required=True, help="where the simulations and replay.csv go")
    parser.add_argument("--profile", default=None, help="default: the model's committed one")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for every simulation (repeatable)",
    )
    parser.add_argument(
        "--default-only",
        action="store_true",
        help="only the default simulation (no host timeline or device scale measured)",
    )
    args = parser.parse_args(argv)
    try:
        table = replay(args.real, Path(args.out), args.profile, args.set, args.default_only)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    shown = table.assign(run=table.run.str[-40:]).drop(columns="sim")
    percent = [c for c in shown.columns if c not in ("run", "way", "within", "device_scale")]
    shown[percent] = (100 * shown[percent]).round(1)
    print(shown.to_string(index=False))
    for way, met in targets_met(table).items():
        print(f"{way}: {met} of {len(TARGETS) * (table.way == way).sum()} targets met")
    print(f"\nwrote {Path(args.out) / 'replay.csv'} (errors as fractions; shown here in %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
