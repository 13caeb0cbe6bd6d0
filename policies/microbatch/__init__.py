"""Micro-batch schedulers: which fitting requests run this step, and each context's chunk."""

from policies.microbatch.chunking import CHUNKING_POLICIES, equal_progress, first_come_first_served
from policies.microbatch.token_budget import TokenBudgetMicroBatchScheduler

__all__ = [
    "CHUNKING_POLICIES",
    "TokenBudgetMicroBatchScheduler",
    "equal_progress",
    "first_come_first_served",
]
