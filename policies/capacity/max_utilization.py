"""MAX_UTILIZATION: reserve only the next step, preempt by recompute when the pool runs short.

Walk the active requests in arrival order; each needs only the blocks of its next step. When one
does not fit, pause the most recently started request behind it (scanning from the end of the
list), pretend its blocks are free, drop it and everything after it from this pass, and retry::

    active:  [g0 g1 c2 g3 p4 g5]        g = generating, c = chunked context, p = pending
    c2 does not fit -> victim g5 (last started) -> [g0 g1 c2 g3 p4] -> retry c2
    still short     -> victim g3                 -> [g0 g1 c2]       -> retry c2

No started request left behind it: stop. A paused request keeps its tokens and is recomputed when
it is admitted again (its freed blocks may still be found in the prefix cache).
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.kv_cache import KVCacheManager
from engine.request import Request
from engine.scheduler import CapacityOutput, CapacityScheduler
from policies.capacity.guaranteed_no_evict import check_max_num_requests


class MaxUtilizationScheduler(CapacityScheduler):
    steady_decode = True  # see the base class: the simulated engine may skip repeated steps

    def __init__(self, max_num_requests: int = 256):
        self.max_num_requests = check_max_num_requests(max_num_requests)

    def schedule(
        self, active_requests: Sequence[Request], kv_cache_manager: KVCacheManager
    ) -> CapacityOutput:
        kv = kv_cache_manager
        kv.start_scheduling()
        fitting: list[Request] = []
        paused: list[Request] = []
        end = len(active_requests)  # candidates are active_requests[:end]
        i = 0
        while i < end and len(fitting) < self.max_num_requests:
            request = active_requests[i]
            num_needed = kv.get_needed_blocks_one_step(request)
            if kv.scheduling_has_free_blocks(num_needed):
                kv.scheduling_add_sequence(request, num_needed)
                fitting.append(request)
                i += 1
                continue
            victim = next((j for j in range(end - 1, i, -1) if active_requests[j].is_started), None)
            if victim is None:
                break
            kv.scheduling_remove_sequence(active_requests[victim])
            paused.append(active_requests[victim])
            end = victim
        return CapacityOutput(fitting, paused)
