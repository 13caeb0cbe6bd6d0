"""The executor: LLM -> PyExecutor -> ModelEngine, Decoder, Scheduler, ResourceManager."""

from engine.clock import VirtualClock, WallClock
from engine.decoder import Decoder
from engine.executor import PyExecutor
from engine.kv_cache import KVCacheExhaustedError, KVCacheManager, KVCacheStats
from engine.llm import LLM, RequestMetrics, RequestOutput
from engine.request import FinishReason, Request, RequestState, SamplingParams
from engine.resource_manager import BaseResourceManager, ResourceManager
from engine.scheduler import (
    CapacityOutput,
    CapacityScheduler,
    MicroBatchScheduler,
    Scheduler,
    SchedulerOutput,
)
from engine.stats import IterationStats

__all__ = [
    "LLM",
    "BaseResourceManager",
    "CapacityOutput",
    "CapacityScheduler",
    "Decoder",
    "FinishReason",
    "IterationStats",
    "KVCacheExhaustedError",
    "KVCacheManager",
    "KVCacheStats",
    "MicroBatchScheduler",
    "PyExecutor",
    "Request",
    "RequestMetrics",
    "RequestOutput",
    "RequestState",
    "ResourceManager",
    "SamplingParams",
    "Scheduler",
    "SchedulerOutput",
    "VirtualClock",
    "WallClock",
]
