"""STATIC_BATCH: GUARANTEED_NO_EVICT, but new requests join only when no generation is in flight,
so a batch runs to its end before the next one starts (the pre-Orca baseline)."""

from __future__ import annotations

from collections.abc import Sequence

from engine.request import Request
from policies.capacity.guaranteed_no_evict import GuaranteedNoEvictScheduler


class StaticBatchScheduler(GuaranteedNoEvictScheduler):
    def can_admit_new(self, active_requests: Sequence[Request]) -> bool:
        return not any(r.is_generation for r in active_requests)
