"""The GPU's clocks and power over a real run, sampled with ``nvidia-smi``.

Why a run records them: the same batch does not always take the same time. An H200 that runs
long prefills back to back draws its 700 W cap and lowers its SM clock to keep under it (1,550
MHz against 1,950 at 600 W on the same llama-8b, docs/performance.md "Power"), so a workload's
steps can run 5% slower than the same shapes in a lighter one. The clock and power each step ran
at are what tell the two apart when a result, or the simulator, disagrees with another run.

``GpuTelemetry`` runs ``nvidia-smi --query-gpu=... --loop-ms=N`` beside the run, into a CSV in
the run directory (``gpu_telemetry.csv``); ``read_samples`` parses it, ``at_steps`` gives each
step the sample nearest its middle and ``telemetry_summary`` the run's medians::

    nvidia-smi line:  2026/11/29 08:30:45.248, 1590, 3201, 689.50, 50, 0x0000000000000004
                      timestamp (local)        SM MHz mem MHz W   C   clock-event reasons
    step:             epoch_origin + time ... + step_latency / 2  ->  nearest sample

Only CUDA runs of the real engine sample (``executor.gpu_telemetry``, default on); without
``nvidia-smi`` the run says so in a warning and records none.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

TELEMETRY_FILE = "gpu_telemetry.csv"
TIMESTAMP_FORMAT = "%Y/%m/%d %H:%M:%S.%f"  # nvidia-smi's, in the machine's local time
# The fields asked for, in the order of the CSV's columns. Drivers before r535 call the last one
# clocks_throttle_reasons.active (``reasons_field``).
FIELDS = ("timestamp", "clocks.sm", "clocks.mem", "power.draw", "temperature.gpu")
REASONS_FIELDS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")
FIRST_SAMPLE_WAIT_S = 5.0
COLUMNS = ("epoch_s", "sm_clock_mhz", "mem_clock_mhz", "power_w", "temperature_c", "reasons")
# nvmlClocksEventReasons bits: why the SM clock is below its maximum.
# The software power cap: power management holds the clock. On the H200 it was set in 90% of
# the samples at 1,965 MHz and 600 W too: it says that, not by how much (read the clock).
POWER_CAP = 0x4
THERMAL = 0x20 | 0x40 | 0x80  # software and hardware thermal slowdown, power brake


@dataclass
class GpuTelemetry:
    """Samples one GPU every ``interval_ms`` into ``path`` while open (a context manager).

    ``device``: what ``nvidia-smi --id`` takes (an index, a PCI bus id or a ``GPU-<uuid>``).
    ``start`` raises ``FileNotFoundError`` where there is no ``nvidia-smi`` (``executable``).
    """

    path: Path
    device: str = "0"
    interval_ms: int = 100
    executable: str = "nvidia-smi"
    _process: subprocess.Popen | None = field(default=None, init=False, repr=False)

    def start(self) -> None:
        binary = shutil.which(self.executable)
        if binary is None:
            raise FileNotFoundError(f"{self.executable} not found on PATH")
        fields = ",".join((*FIELDS, reasons_field(binary, self.device)))
        with open(self.path, "w") as out:  # the child holds its own descriptor
            self._process = subprocess.Popen(
                [binary, f"--id={self.device}", f"--query-gpu={fields}",
                 "--format=csv,noheader,nounits", f"--loop-ms={self.interval_ms}"],
                stdout=out,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
        # The run starts once the first sample is in: its first steps get a clock too.
        deadline = time.monotonic() + FIRST_SAMPLE_WAIT_S
        while time.monotonic() < deadline and self._process.poll() is None:
            if self.path.stat().st_size > 0:
                break
            time.sleep(0.01)

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()  # nvidia-smi writes each sample as it takes it
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def __enter__(self) -> GpuTelemetry:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def reasons_field(binary: str, device: str) -> str:
    """The clock-event reasons field this driver's ``nvidia-smi`` knows (the older name
    where the newer one is refused)."""
    for name in REASONS_FIELDS[:-1]:
        probe = subprocess.run(
            [binary, f"--id={device}", f"--query-gpu={name}", "--format=csv,noheader"],
            capture_output=True,
            timeout=30,
        )
        if probe.returncode == 0:
            return name
    return REASONS_FIELDS[-1]


def read_samples(path: Path) -> pd.DataFrame:
    """The samples in a ``GpuTelemetry`` CSV: ``COLUMNS`` (epoch seconds, MHz, W, degrees C,
    the reasons bit mask), plus ``is_power_capped`` and ``is_thermal``. A field the GPU does not
    report (``[N/A]``) is NaN; a line cut short when sampling stopped is dropped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != len(COLUMNS):
            continue
        try:
            epoch = datetime.strptime(parts[0], TIMESTAMP_FORMAT).timestamp()
        except ValueError:
            continue
        rows.append([epoch, *map(_number, parts[1:5]), _bits(parts[5])])
    frame = pd.DataFrame(rows, columns=list(COLUMNS)).astype(float)
    reasons = frame.reasons.fillna(0).astype(np.int64)
    frame["is_power_capped"] = (reasons & POWER_CAP) > 0
    frame["is_thermal"] = (reasons & THERMAL) > 0
    return frame


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # [N/A], [Not Supported]
        return math.nan


def _bits(text: str) -> float:
    try:
        return float(int(text, 16))
    except ValueError:
        return math.nan


def at_steps(samples: pd.DataFrame, iterations: pd.DataFrame, epoch_origin: float) -> pd.DataFrame:
    """Each step's SM clock and power: the sample nearest the step's middle (``time`` is on the
    run's clock, which read 0 at ``epoch_origin``). Columns ``sm_clock_mhz``, ``power_w``;
    NaN where no sample lies within two sampling intervals of it (or there are under two)."""
    middle = epoch_origin + iterations["time"].to_numpy() + iterations["step_latency"] / 2
    times = samples["epoch_s"].to_numpy()
    names = ("sm_clock_mhz", "power_w")
    if len(times) < 2:
        return pd.DataFrame({n: np.nan for n in names}, index=iterations.index)
    right = np.searchsorted(times, middle).clip(1, len(times) - 1)
    left = right - 1
    nearest = np.where(middle - times[left] <= times[right] - middle, left, right)
    is_close = np.abs(times[nearest] - middle) <= 2 * np.median(np.diff(times))
    return pd.DataFrame(
        {n: np.where(is_close, samples[n].to_numpy()[nearest], np.nan) for n in names},
        index=iterations.index,
    )


def telemetry_summary(samples: pd.DataFrame, start: float, end: float) -> dict[str, float]:
    """The run's GPU from ``start`` to ``end`` (epoch seconds): median SM clock and power, the
    largest temperature, and the share of samples at the power cap and in a thermal slowdown.
    Empty where no sample lies in that window."""
    window = samples[(samples.epoch_s >= start) & (samples.epoch_s <= end)]
    if window.empty:
        return {}
    return {
        "gpu_sm_clock_mhz_p50": float(window.sm_clock_mhz.median()),
        "gpu_power_w_p50": float(window.power_w.median()),
        "gpu_temperature_c_max": float(window.temperature_c.max()),
        "gpu_power_capped_share": float(window.is_power_capped.mean()),
        "gpu_thermal_share": float(window.is_thermal.mean()),
    }
