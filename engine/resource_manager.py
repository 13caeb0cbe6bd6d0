"""Per-request resources (KV cache first among them) behind one small interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from engine.request import Request

if TYPE_CHECKING:
    from engine.kv_cache import KVCacheManager
    from engine.scheduler import SchedulerOutput


class BaseResourceManager(ABC):
    """One kind of per-request resource.

    The executor calls, each step: ``free_resources`` for paused requests, then
    ``prepare_resources(batch)`` before the forward, ``update_resources(batch)`` after the
    step's counters advanced, and ``free_resources`` for each finished request.
    """

    @abstractmethod
    def prepare_resources(self, batch: SchedulerOutput) -> None: ...

    @abstractmethod
    def update_resources(self, batch: SchedulerOutput) -> None: ...

    @abstractmethod
    def free_resources(self, request: Request) -> None: ...

    @abstractmethod
    def get_max_resource_count(self) -> int: ...

    @abstractmethod
    def get_needed_resource_to_completion(self, request: Request) -> int: ...

    def reject_reason(self, request: Request) -> str | None:
        """Why this request can never be served with this resource (checked on arrival)."""
        return None


class ResourceManager:
    """Holds several resource managers and calls them in order; the KV cache is always last."""

    def __init__(self, kv_cache_manager: KVCacheManager, **others: BaseResourceManager):
        self.managers: dict[str, BaseResourceManager] = {
            **others,
            "kv_cache_manager": kv_cache_manager,
        }
        self.kv_cache_manager = kv_cache_manager

    def prepare_resources(self, batch: SchedulerOutput) -> None:
        for manager in self.managers.values():
            manager.prepare_resources(batch)

    def update_resources(self, batch: SchedulerOutput) -> None:
        for manager in self.managers.values():
            manager.update_resources(batch)

    def free_resources(self, request: Request) -> None:
        for manager in self.managers.values():
            manager.free_resources(request)

    def reject_reason(self, request: Request) -> str | None:
        for manager in self.managers.values():
            reason = manager.reject_reason(request)
            if reason is not None:
                return reason
        return None
