"""Run directories: writing one run's results, and loading a run or a whole sweep for notebooks.

Layout of a run directory::

    config.yaml          composed config (written by the caller, or by write_run if given)
    run.json             {"name", "overrides": ["key=value", ...], "status": "ok"|"failed",
                          "error": str|None, ...free extra fields}
    requests.parquet     harness.metrics.requests_frame
    iterations.parquet   harness.metrics.iterations_frame
    summary.json         harness.metrics.summarize (NaN stored as null: strict JSON)
    *.png                harness.plots.run_plots

A sweep directory holds run directories at depth 1 or 2 (``sweep/<run>/run.json`` or
``sweep/<group>/<run>/run.json``), plus ``summary.csv`` and comparison plots from
``write_sweep_summary``.

Every file is written to a temporary name in its directory and moved into place with
``os.replace``, so an interrupted run leaves whole files or none. ``run.json`` is written after
the data files (and an old one removed first): a run.json with status "ok" means the data is
complete.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pandas as pd
import yaml

from harness import plots as plotting
from harness.metrics import requests_frame

RUN_INFO = "run.json"
CONFIG = "config.yaml"
REQUESTS = "requests.parquet"
ITERATIONS = "iterations.parquet"
SUMMARY = "summary.json"
SWEEP_SUMMARY = "summary.csv"
_MAX_SWEEP_DEPTH = 2


@dataclass
class RunResult:
    """One run, as loaded from its directory. A failed run has empty frames and summary."""

    path: Path
    config: dict
    info: dict
    requests: pd.DataFrame
    iterations: pd.DataFrame
    summary: dict

    @property
    def name(self) -> str:
        return str(self.info.get("name") or self.path.name)

    @property
    def status(self) -> str:
        return str(self.info.get("status", "unknown"))

    @property
    def overrides(self) -> dict[str, Any]:
        """``run.json``'s overrides as {key: value}, numbers parsed (see ``parse_overrides``)."""
        return parse_overrides(self.info.get("overrides") or [])


@dataclass
class SweepResult:
    """Every run under a sweep directory. ``summary`` has one row per run (columns run, name,
    status, error, one per override key, then the summary keys); ``requests`` and ``iterations``
    are the runs' frames concatenated, led by ``run`` and the override columns."""

    path: Path
    runs: list[RunResult]
    summary: pd.DataFrame
    requests: pd.DataFrame
    iterations: pd.DataFrame
    override_keys: list[str] = field(default_factory=list)


# ---- writing -------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write`` on a temp file beside ``path``, then move it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _write_text(path: Path, text: str) -> Path:
    return _atomic_write(path, lambda f: f.write(text.encode()))


def _jsonable(value: Any) -> Any:
    """NaN/inf become null (strict JSON); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()  # numpy scalar
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json(path: Path, data: dict) -> Path:
    return _write_text(path, json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")


def _write_parquet(path: Path, frame: pd.DataFrame) -> Path:
    return _atomic_write(path, lambda f: frame.to_parquet(f, index=False))


def _run_info(run_info: dict, status: str, error: str | None) -> dict:
    info = {"name": None, "overrides": [], **run_info, "status": status, "error": error}
    info["overrides"] = [str(o) for o in info["overrides"]]
    return info


def write_run(
    run_dir: str | os.PathLike,
    *,
    requests: pd.DataFrame,
    iterations: pd.DataFrame,
    summary: dict,
    run_info: dict,
    config_yaml: str | None = None,
    plots: bool = True,
) -> Path:
    """Write a successful run into ``run_dir`` (created if needed) and return its path.

    ``run_info`` gives run.json's name, overrides and any extra fields; status is set to "ok"
    and error to None. Order: config.yaml (if given), frames, summary.json, then run.json (the
    mark of a complete run), then the run plots (best left last: a crash while drawing loses
    only plots).
    """
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_INFO).unlink(missing_ok=True)  # an old run.json must not vouch for new data
    if config_yaml is not None:
        _write_text(out / CONFIG, config_yaml)
    _write_parquet(out / REQUESTS, requests)
    _write_parquet(out / ITERATIONS, iterations)
    _write_json(out / SUMMARY, summary)
    info = _run_info(run_info, "ok", None)
    _write_json(out / RUN_INFO, info)
    if plots:
        _draw_run_plots(out, requests, iterations, info)
    return out


def _draw_run_plots(out: Path, requests, iterations, info: dict) -> list[Path]:
    title = info.get("name") or ", ".join(info.get("overrides") or []) or out.name
    return plotting.run_plots(requests, iterations, out, title=str(title))


def write_failed_run(run_dir: str | os.PathLike, *, run_info: dict, error: str) -> Path:
    """Record a failed run: run.json with status "failed" and ``error``; nothing else."""
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / RUN_INFO, _run_info(run_info, "failed", error))
    return out


# ---- loading -------------------------------------------------------------------------------
_INT = re.compile(r"[+-]?\d+")


def parse_value(text: str) -> Any:
    """An override value as int or float when it looks numeric ("4", "0.5", "1e3", "inf"),
    else the string unchanged."""
    s = text.strip()
    if _INT.fullmatch(s):
        return int(s)
    try:
        return float(s)
    except ValueError:
        return text


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=4", "+c=x"]`` -> ``{"a.b": 4, "c": "x"}``. Hydra's add/force prefixes (+, ++) are
    dropped from keys; entries without "=" (deletions like ``~key``) carry no value and are
    skipped."""
    out: dict[str, Any] = {}
    for entry in overrides:
        key, sep, value = str(entry).partition("=")
        if not sep:
            continue
        out[key.strip().lstrip("+")] = parse_value(value)
    return out


def _read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _empty_requests() -> pd.DataFrame:
    return requests_frame([])


def load_run(run_dir: str | os.PathLike) -> RunResult:
    """One run directory (must hold run.json). Failed runs get empty frames and summary; the
    summary's nulls come back as NaN; ``itl_ms`` cells come back as lists."""
    path = Path(run_dir)
    info = _read_json(path / RUN_INFO)
    config: dict = {}
    if (path / CONFIG).exists():
        with open(path / CONFIG) as f:
            config = yaml.safe_load(f) or {}
    if info.get("status") != "ok":
        return RunResult(path, config, info, _empty_requests(), pd.DataFrame(), {})
    requests = pd.read_parquet(path / REQUESTS)
    if "itl_ms" in requests:
        # Parquet gives numpy arrays; lists are what requests_frame makes.
        requests["itl_ms"] = [list(map(float, x)) for x in requests["itl_ms"]]
    iterations = pd.read_parquet(path / ITERATIONS)
    summary = {k: float("nan") if v is None else v for k, v in _read_json(path / SUMMARY).items()}
    return RunResult(path, config, info, requests, iterations, summary)


def _natural_key(rel: str) -> list:
    # "run_2" before "run_10", as Hydra's job numbers should sort.
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", rel)]


def find_runs(sweep_dir: str | os.PathLike) -> list[Path]:
    """Run directories (holding run.json) at depth 1 or 2 under ``sweep_dir``, naturally
    sorted."""
    root = Path(sweep_dir)
    found: list[Path] = []
    for depth in range(1, _MAX_SWEEP_DEPTH + 1):
        pattern = "/".join(["*"] * depth) + "/" + RUN_INFO
        found += [p.parent for p in root.glob(pattern) if p.is_file()]
    return sorted(found, key=lambda p: _natural_key(p.relative_to(root).as_posix()))


def load(path: str | os.PathLike) -> RunResult | SweepResult:
    """A run directory (or its run.json) -> RunResult; a sweep directory -> SweepResult.

    Raises FileNotFoundError when ``path`` is missing or holds neither a run.json nor run
    directories (depth <= 2).
    """
    p = Path(path)
    if p.is_file() and p.name == RUN_INFO:
        p = p.parent
    if not p.is_dir():
        raise FileNotFoundError(f"no such results directory: {p}")
    if (p / RUN_INFO).is_file():
        return load_run(p)
    run_dirs = find_runs(p)
    if not run_dirs:
        raise FileNotFoundError(
            f"{p} is not a run or sweep directory: no {RUN_INFO} in it or in its subdirectories "
            f"(depth <= {_MAX_SWEEP_DEPTH})"
        )
    return _load_sweep(p, run_dirs)


def _load_sweep(root: Path, run_dirs: list[Path]) -> SweepResult:
    runs = [load_run(d) for d in run_dirs]
    rels = [d.relative_to(root).as_posix() for d in run_dirs]
    overrides = [r.overrides for r in runs]
    keys: list[str] = []
    for o in overrides:
        keys += [k for k in o if k not in keys]

    rows = []
    for rel, run, o in zip(rels, runs, overrides, strict=True):
        rows.append(
            {
                "run": rel,
                "name": run.info.get("name"),
                "status": run.status,
                "error": run.info.get("error"),
                **{k: o.get(k) for k in keys},
                **{k: v for k, v in run.summary.items() if k not in ("run", "status", "error")},
            }
        )
    summary = pd.DataFrame(rows)

    def tagged(frames: list[pd.DataFrame]) -> pd.DataFrame:
        parts = []
        for rel, frame, o in zip(rels, frames, overrides, strict=True):
            if frame.empty:
                continue
            lead = pd.DataFrame({"run": rel, **{k: o.get(k) for k in keys}}, index=frame.index)
            parts.append(pd.concat([lead, frame], axis=1))
        if not parts:
            return pd.DataFrame(columns=["run", *keys])
        return pd.concat(parts, ignore_index=True)

    return SweepResult(
        path=root,
        runs=runs,
        summary=summary,
        requests=tagged([r.requests for r in runs]),
        iterations=tagged([r.iterations for r in runs]),
        override_keys=keys,
    )


def write_sweep_summary(sweep_dir: str | os.PathLike, *, plots: bool = True) -> Path:
    """Write ``summary.csv`` (``SweepResult.summary``) and the comparison plots into
    ``sweep_dir``; return the CSV's path. Failed runs appear with status "failed"."""
    root = Path(sweep_dir)
    result = load(root)
    if not isinstance(result, SweepResult):
        raise ValueError(f"{root} is a single run directory, not a sweep")
    csv = _write_text(root / SWEEP_SUMMARY, result.summary.to_csv(index=False))
    if plots:
        plotting.sweep_plots(
            result.summary, result.requests, result.iterations, result.override_keys, root
        )
    return csv


__all__ = [
    "RunResult",
    "SweepResult",
    "find_runs",
    "load",
    "load_run",
    "parse_overrides",
    "write_failed_run",
    "write_run",
    "write_sweep_summary",
]
