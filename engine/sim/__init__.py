"""The simulated engine (``executor.engine=sim``): same executor and policies, predicted time.

cost_model.py  StepFeatures, CostModel, RooflineCostModel (baseline), LinearCostModel (fitted),
               HostDeviceCostModel (overlap: the host's and the device's times fitted apart)
padding.py     StepPadding: the graph buckets a real step's dense layers run on
decode_splits.py  DecodeSplits: how the decode kernel splits a step's sequences (its tail)
profile.py     Profile: measured step times of the real engine for one (device, model)
profiler.py    python -m engine.sim.profiler: runs the real engine over a grid, writes a profile
engine.py      SimModelEngine, SimDecoder
host_timeline.py  HostTimeline: a real run's host speed over time, replayed
host_speeds.py   HostSpeeds, TwoSpeedHost: a simulated host that switches between two speeds
power.py       PowerCap: a device that slows down while its recent work has been heavy
fast_forward.py  runs of identical decode steps advanced in one go (the plain loop)
fast_forward_overlap.py  the same in the overlap loop (the host pipeline)
"""

from engine.sim.cost_model import (
    CostModel,
    HostDeviceCostModel,
    LinearCostModel,
    RooflineCostModel,
    StepFeatures,
)
from engine.sim.engine import PLACEHOLDER_TOKEN, SimDecoder, SimModelEngine
from engine.sim.host_speeds import HostSpeeds, TwoSpeedHost
from engine.sim.host_timeline import HostTimeline
from engine.sim.power import PowerCap
from engine.sim.profile import Profile, available_profiles, default_profile_path

__all__ = [
    "PLACEHOLDER_TOKEN",
    "CostModel",
    "HostDeviceCostModel",
    "HostSpeeds",
    "HostTimeline",
    "LinearCostModel",
    "PowerCap",
    "Profile",
    "RooflineCostModel",
    "SimDecoder",
    "SimModelEngine",
    "StepFeatures",
    "TwoSpeedHost",
    "available_profiles",
    "default_profile_path",
]
