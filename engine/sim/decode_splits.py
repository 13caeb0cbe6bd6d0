"""The decode kernel's splits, for the cost model: a decode step's attention ends with its
longest program, which walks the longest sequence's KV over that sequence's splits.

The Triton decode kernel (``kernels/paged_decode.py``) runs one program per (sequence, KV head,
split); ``kernels.decode_splits.num_decode_splits`` cuts each sequence's KV range into splits
until the GPU has about two programs per SM. On the H200 (132 SMs) llama-1b and llama-8b (8 KV
heads each) run their decode graphs of 1-32 rows in 16 to 2 splits, and those of 48 rows and
more in one, so the attention's tail is ``max_decode_kv / splits``::

    decode-only step   programs: its CUDA graph's padded batch x KV heads; the graph's block
                       table is as wide as the model's longest sequence
    mixed step         programs: its decodes x KV heads; the step's block table, at least as
                       wide as its longest decode

A line in ``max_decode_kv`` alone (one slope for every graph) put llama-1b's Azure decode steps
of 33-128 sequences 4-8% over their device time and a heavier window's of 49-64 4% under
(docs/performance.md, "The decode kernel's splits").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kernels.decode_splits import num_decode_splits

if TYPE_CHECKING:
    from engine.sim.cost_model import StepFeatures
    from engine.sim.profile import Profile

# SMs of the GPUs our profiles were made on, by the name torch gives them (profiles made since
# the profiler records it carry their own, ``Profile.engine["num_sms"]``).
NUM_SMS = {"NVIDIA H100 80GB HBM3": 132, "NVIDIA H200": 132}


@dataclass(frozen=True)
class DecodeSplits:
    """The split rule of one (GPU, model): ``num_sms`` SMs, ``num_kv_heads``, and the decode
    graphs' block-table width ``max_positions`` (the model's max length); ``graphs`` False: the
    engine ran its decodes eagerly, as a mixed step's (programs per decode, not per row)."""

    num_sms: int
    num_kv_heads: int
    max_positions: int
    graphs: bool = True
    # A decode graph's padded rows -> its splits: span runs once a simulated step (a mixed
    # step's, which also hangs on its longest decode, is worked out each time)
    _graph_splits: dict[int, int] = field(default_factory=dict, compare=False, repr=False)

    def span(self, features: StepFeatures) -> float:
        """The longest KV range one program of the step's decode attention walks: its longest
        decode's KV length over that decode's splits (0 without decodes)."""
        max_kv = features.max_decode_kv
        if not max_kv:
            return 0.0
        if not (self.graphs and features.num_context_tokens == 0):
            programs = features.num_decode_seqs * self.num_kv_heads
            return max_kv / num_decode_splits(self.num_sms, programs, max_kv)
        rows = features.num_padded_tokens
        splits = self._graph_splits.get(rows)
        if splits is None:
            programs = rows * self.num_kv_heads
            splits = num_decode_splits(self.num_sms, programs, self.max_positions)
            self._graph_splits[rows] = splits
        return max_kv / splits

    @classmethod
    def of_profile(cls, profile: Profile) -> DecodeSplits | None:
        """The rule of the profile's model on its GPU (its SMs as the profiler recorded them,
        else ``NUM_SMS``), or None for a GPU of unknown SMs: then a decode's attention tail is
        fitted as one split (``max_decode_kv``)."""
        num_sms = profile.engine.get("num_sms") or NUM_SMS.get(profile.device)
        if num_sms is None:
            return None
        from engine.models import model_limits, model_shape

        _, max_len = model_limits(profile.model)
        graphs = profile.engine.get("cuda_graphs", True)
        return cls(num_sms, model_shape(profile.model).num_kv_heads, max_len, graphs)
