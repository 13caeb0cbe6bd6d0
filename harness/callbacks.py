"""Hydra callbacks: after a sweep (or a multi-variant experiment), write the combined summary
and comparison plots, and print one line per run."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from harness.report import print_sweep
        from harness.results import load, write_sweep_summary

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        try:
            write_sweep_summary(sweep_dir)
            sweep = load(sweep_dir)
            print_sweep(sweep, sweep_dir)
        except Exception:  # the jobs' own results are already on disk: report, don't lose them
            log.exception("could not write the sweep summary of %s", sweep_dir)
            return
        if any(run.status != "ok" for run in sweep.runs):
            sys.exit(1)  # after the summary: a script sees the failure, the results stay
