"""The simulated engine: the real executor and policies, with a step's time predicted.

``SimModelEngine.forward`` computes no logits: it turns the scheduled batch into
``StepFeatures``, asks its ``CostModel`` for the step's time and advances the executor's
``VirtualClock`` by it, so every timestamp the executor stamps afterwards (first token, token
times, finish) is simulated time. ``SimDecoder`` returns the same placeholder token for every
request: outputs carry no content, and their lengths come from ``max_new_tokens`` (as with
``ignore_eos``), which is how workloads give them anyway.
"""

from __future__ import annotations

from engine.clock import VirtualClock
from engine.kv_cache import KVCacheManager
from engine.model_engine import ModelEngine
from engine.request import Request
from engine.scheduler import SchedulerOutput
from engine.sim.cost_model import CostModel, StepFeatures

# Never a vocabulary id, so it can match no EOS or stop token: a simulated request always runs
# to max_new_tokens.
PLACEHOLDER_TOKEN = -1


class SimModelEngine(ModelEngine):
    def __init__(
        self, cost_model: CostModel, clock: VirtualClock, vocab_size: int, max_seq_len: int
    ):
        self.cost_model = cost_model
        self.clock = clock
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.last_step_seconds = 0.0
        self._features = StepFeatures()

    def step_work(self, batch: SchedulerOutput) -> tuple[float, int, int]:
        features = self._features
        return features.context_attention, features.decode_kv_tokens, features.max_decode_kv

    def forward(
        self, batch: SchedulerOutput, kv_cache_manager: KVCacheManager, pending_tokens: None = None
    ) -> None:
        self._features = features = StepFeatures.of(batch)
        seconds = self.cost_model.predict(features)
        if not seconds > 0:
            raise ValueError(
                f"{type(self.cost_model).__name__} predicted {seconds} s for a step "
                f"({features}); a step must take a positive time"
            )
        self.last_step_seconds = seconds
        self.clock.advance(seconds)
        return None


class SimDecoder:
    """The decoder of the simulated engine: one placeholder token per sampling request."""

    def decode(self, requests: list[Request], logits: None) -> list[int]:
        return [PLACEHOLDER_TOKEN] * len(requests)

    def release(self, request: Request) -> None:
        pass
