"""The simulated engine: the real executor and policies, with a step's time predicted.

``SimModelEngine.forward`` computes no logits: it turns the scheduled batch into
``StepFeatures``, asks its ``CostModel`` for the step's time and queues the step on a virtual
device; the decoder's read of the step's tokens moves the executor's ``VirtualClock`` to the
step's end, so every timestamp the executor stamps afterwards (first token, token times, finish)
is simulated time. The virtual device runs steps back to back, so overlap scheduling works as on
a GPU: a step queued while another runs starts when that one ends::

    virtual time      t0             t1               t2
    device            |--- step n ---|--- step n+1 ---|
    plain loop        step n+1 scheduled at t1 (after step n's tokens), n+2 at t2
    overlap loop      step n+1 scheduled at t0 (while step n runs),     n+2 at t1

A step's time carries what the host adds: in plain runs, the host's time and then the device's;
with overlap, the longer of the two (``engine.stats.IterationStats.host_time``), which a profile
whose serving steps record both predicts apart (``cost_model.HostDeviceCostModel``: a faster or
slower host is a scale on one of them).

With ``pipeline=True`` (overlap only) the host is a second stage instead of a share of the
step: the host's time passes on the clock, and the device starts a step once the host has
done its work before the launches (``StepPhases``: scheduling, KV, reading the last step) and
the step before it has ended; it cannot end before the host has launched it::

    host     | before n | launch n ......... | wait | before n+1 | launch n+1 | wait (read n) |
    device   .. step n-1 ..| step n (from before n's end) .............| step n+1 ...

So a token is read once the device has it and the host is done launching the next step, as on
a GPU: a first token waits for the host's work and then the device's, in series, where the
max above charges only the longer of the two. ``SimDecoder`` returns the same placeholder token
for every request: outputs carry no content, and their lengths come from ``max_new_tokens`` (as
with ``ignore_eos``), which is how workloads give them anyway.

With a ``host_timeline`` (``engine.sim.host_timeline``: a real run's host speed over time, or
an ``engine.sim.host_speeds.TwoSpeedHost`` drawn from two measured speeds) a step's host time is
scaled by the timeline's scale at the second the step starts in, on top of
``HostDeviceCostModel.host_time_scale``. With a ``power`` cap (``engine.sim.power``) a step's
device time is scaled by how heavy the device's work has been just before the step starts
(with the pipeline: before the device starts it).

A step's tokens are padded (``StepFeatures.num_padded_tokens``) to the graph buckets of the
engine simulated, ``padding`` (``engine.sim.padding``): its GEMMs run on the bucket's rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.clock import VirtualClock
from engine.kv_cache import KVCacheManager
from engine.model_engine import ModelEngine
from engine.request import Request
from engine.scheduler import SchedulerOutput
from engine.sim.cost_model import CostModel, HostDeviceCostModel, StepFeatures
from engine.sim.host_speeds import TwoSpeedHost
from engine.sim.host_timeline import HostTimeline
from engine.sim.padding import StepPadding
from engine.sim.power import PowerCap
from engine.stats import StepWork

# Never a vocabulary id, so it can match no EOS or stop token: a simulated request always runs
# to max_new_tokens.
PLACEHOLDER_TOKEN = -1


def check_host_device(
    cost_model: CostModel,
    host_timeline: HostTimeline | TwoSpeedHost | None = None,
    power: PowerCap | None = None,
) -> None:
    """A ``ValueError`` where a host timeline or a power cap is given with a cost model that
    does not predict the host's and the device's times apart (they scale one of the two)."""
    for name, given in (("a host timeline", host_timeline), ("a power cap", power)):
        if given is not None and not isinstance(cost_model, HostDeviceCostModel):
            raise ValueError(
                f"{name} needs a HostDeviceCostModel (a profile with host and device times "
                f"apart), not {type(cost_model).__name__}"
            )


class SimModelEngine(ModelEngine):
    supports_overlap = True  # tokens are placeholders: nothing pending to fill

    def __init__(
        self,
        cost_model: CostModel,
        clock: VirtualClock,
        vocab_size: int,
        max_seq_len: int,
        padding: StepPadding | None = None,
        pipeline: bool = False,
        host_timeline: HostTimeline | TwoSpeedHost | None = None,
        power: PowerCap | None = None,
    ):
        if pipeline and not (
            isinstance(cost_model, HostDeviceCostModel) and cost_model.launch is not None
        ):
            raise ValueError(
                "the host pipeline needs a HostDeviceCostModel with a launch model "
                f"(Profile.cost_model(with_launch=True)), not {type(cost_model).__name__}"
            )
        check_host_device(cost_model, host_timeline=host_timeline, power=power)
        self.cost_model = cost_model
        self.host_timeline = host_timeline
        self.power = None if power is None else power.state()
        # What a step costs (fast_forward calls it too; once for each step, in time order):
        # with a timeline, at the host's speed of the second the step starts in on the device;
        # with a power cap, at the device's speed its recent work leaves it.
        plain = host_timeline is None and power is None
        self.predict = cost_model.predict if plain else self._predict_scaled
        self.pipeline = pipeline
        self.padding = padding or StepPadding()  # the simulated engine's graph buckets
        self.clock = clock
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.device_free_at = 0.0  # virtual time the device ends the last step queued on it
        self._features = StepFeatures()

    def step_work(self, batch: SchedulerOutput) -> StepWork:
        f = self._features
        return StepWork(
            f.context_attention, f.decode_kv_tokens, f.max_decode_kv, f.num_padded_tokens
        )

    def forward(
        self,
        batch: SchedulerOutput,
        kv_cache_manager: KVCacheManager,
        pending_tokens: object = None,
    ) -> float:
        """Queue the step on the virtual device; returns the virtual time its tokens are ready
        (what ``SimDecoder`` reads in place of logits)."""
        self._features = features = StepFeatures.of(batch, self.padding)
        return self.queue(features)

    def queue(self, features: StepFeatures) -> float:
        """Queue a step of ``features`` on the virtual device; returns the virtual time its
        tokens are ready (``fast_forward_overlap`` calls it for the steps it replays)."""
        if self.pipeline:
            return self._pipelined(features)
        seconds = self.predict(features)
        if not seconds > 0:
            raise ValueError(
                f"{type(self.cost_model).__name__} predicted {seconds} s for a step "
                f"({features}); a step must take a positive time"
            )
        self.device_free_at = max(self.clock.now(), self.device_free_at) + seconds
        return self.device_free_at

    def _predict_scaled(self, features: StepFeatures) -> float:
        started = max(self.clock.now(), self.device_free_at)
        timeline, power = self.host_timeline, self.power
        host_speed = 1.0 if timeline is None else timeline.scale_at(started)
        if power is None:
            return self.cost_model.predict_on_host(features, host_speed)
        device_speed = power.scale_at(started, is_decode=features.is_decode_only)
        seconds = self.cost_model.predict_on_host(features, host_speed, device_speed)
        if seconds > 0:  # forward refuses any other
            power.observe(started, seconds, features.num_padded_tokens)
        return seconds

    def _pipelined(self, features: StepFeatures) -> float:
        """The host pipeline (module doc): the host's time passes on the clock, the device
        runs the step once the host's work before the launches is done (at the power cap's
        speed of that moment, where there is one)."""
        now, timeline = self.clock.now(), self.host_timeline
        speed = 1.0 if timeline is None else timeline.scale_at(now)
        phases = self.cost_model.phases(features, speed)
        if not (phases.host > 0 and phases.device > 0):
            raise ValueError(
                f"{type(self.cost_model).__name__} predicted {phases} for a step ({features}); "
                "a step must take a positive time"
            )
        began = max(now + phases.before_launch, self.device_free_at)
        device = phases.device
        if self.power is not None:
            device *= self.power.scale_at(began, is_decode=features.is_decode_only)
        ended = max(began + device, now + phases.host)
        if self.power is not None:  # the device's slot feeds the rate, as a real step's does
            self.power.observe(began, ended - began, features.num_padded_tokens)
        self.device_free_at = ended
        self.clock.advance(phases.host)
        return ended


@dataclass(slots=True)
class SimTokens:
    """A simulated step's sampled tokens: placeholders, read once the step has ended."""

    count: int
    ready_at: float
    clock: VirtualClock
    is_cuda = False  # read directly, no copy to the host (``engine.executor``)

    def tolist(self) -> list[int]:
        self.clock.sleep_until(self.ready_at)
        return [PLACEHOLDER_TOKEN] * self.count


class SimDecoder:
    """The decoder of the simulated engine: one placeholder token per sampling request, read
    at the virtual time ``SimModelEngine.forward`` returned."""

    def __init__(self, clock: VirtualClock):
        self.clock = clock

    def decode(self, requests: list[Request], ready_at: float) -> list[int]:
        return self.sample(requests, ready_at).tolist()

    def sample(self, requests: list[Request], ready_at: float) -> SimTokens:
        return SimTokens(len(requests), ready_at, self.clock)

    def release(self, request: Request) -> None:
        pass
