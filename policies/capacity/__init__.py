"""Capacity schedulers: which active requests may hold KV-cache resources this step."""

from policies.capacity.guaranteed_no_evict import GuaranteedNoEvictScheduler
from policies.capacity.max_utilization import MaxUtilizationScheduler
from policies.capacity.static_batch import StaticBatchScheduler

__all__ = ["GuaranteedNoEvictScheduler", "MaxUtilizationScheduler", "StaticBatchScheduler"]
