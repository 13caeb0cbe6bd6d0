"""GUARANTEED_NO_EVICT (TensorRT-LLM's default): reserve every request's worst case up front.

Started requests are always kept and hold back the blocks they may still need to reach
``max_num_tokens``. Pending requests are then admitted in arrival order while their own
worst case fits; the first that does not fit stops the scan (head-of-line blocking), so the
order of service is strictly FCFS and no request is ever paused.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.kv_cache import KVCacheManager
from engine.request import Request
from engine.scheduler import CapacityOutput, CapacityScheduler


def check_max_num_requests(value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(
            f"capacity_scheduler.max_num_requests must be an integer >= 1, got {value!r}"
        )
    return value


class GuaranteedNoEvictScheduler(CapacityScheduler):
    steady_decode = True  # see the base class: the simulated engine may skip repeated steps

    def __init__(self, max_num_requests: int = 256):
        self.max_num_requests = check_max_num_requests(max_num_requests)

    def can_admit_new(self, active_requests: Sequence[Request]) -> bool:
        """Hook for STATIC_BATCH; here new requests may always join."""
        return True

    def schedule(
        self, active_requests: Sequence[Request], kv_cache_manager: KVCacheManager
    ) -> CapacityOutput:
        kv = kv_cache_manager
        kv.start_scheduling()
        # One pass: started requests reserve their worst case wherever they sit in the order;
        # pending ones are collected, in order, for the admission pass.
        fitting: list[Request] = []
        pending: list[Request] = []
        for request in active_requests:
            if request.is_started:
                kv.scheduling_add_sequence(request, kv.get_remaining_blocks_to_completion(request))
                fitting.append(request)
            else:
                pending.append(request)
        if not self.can_admit_new(active_requests):
            return CapacityOutput(fitting, [])
        for request in pending:
            if len(fitting) >= self.max_num_requests:
                break
            num_needed = kv.get_remaining_blocks_to_completion(request)
            if not kv.scheduling_has_free_blocks(num_needed):
                break
            kv.scheduling_add_sequence(request, num_needed)
            fitting.append(request)
        return CapacityOutput(fitting, [])
