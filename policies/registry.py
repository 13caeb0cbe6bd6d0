"""Names for the interchangeable parts, shared by ``engine.LLM`` and the Hydra configs.

A part is given as a registered name (``"max_utilization"``, TensorRT-LLM's upper-case names work
too), a dict of constructor arguments (with an optional ``"name"`` or a Hydra-style
``"_target_": "package.module.Class"``), or an instance of any class that satisfies the interface.
Classes are imported only when used, so this module has no import-time dependencies.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

REGISTRY: dict[str, dict[str, str]] = {
    "capacity_scheduler": {
        "guaranteed_no_evict": "policies.capacity.guaranteed_no_evict.GuaranteedNoEvictScheduler",
        "max_utilization": "policies.capacity.max_utilization.MaxUtilizationScheduler",
        "static_batch": "policies.capacity.static_batch.StaticBatchScheduler",
    },
    "microbatch_scheduler": {
        "token_budget": "policies.microbatch.token_budget.TokenBudgetMicroBatchScheduler",
    },
    "kv_cache_manager": {
        "paged": "policies.kv_cache.paged.PagedKVCacheManager",
    },
}
DEFAULTS = {
    "capacity_scheduler": "guaranteed_no_evict",
    "microbatch_scheduler": "token_budget",
    "kv_cache_manager": "paged",
}


def import_object(path: str) -> Any:
    """``"package.module.Name"`` -> the object, with an error that names the path."""
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"cannot import {path!r}: {error}") from error


def resolve_class(kind: str, name: str) -> type:
    names = REGISTRY[kind]
    key = name.lower()
    if key not in names:
        raise ValueError(
            f"unknown {kind} {name!r}; known: {sorted(names)} "
            "(or an instance, or a dict with '_target_')"
        )
    return import_object(names[key])


def build(kind: str, spec: Any, **defaults: Any) -> Any:
    """Build part ``kind`` from ``spec`` (None, name, dict or instance). ``defaults`` fill
    constructor arguments the spec leaves out (e.g. max_num_requests from max_batch_size)."""
    if kind not in REGISTRY:
        raise ValueError(f"unknown part {kind!r}; known: {sorted(REGISTRY)}")
    if spec is None:
        spec = DEFAULTS[kind]
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        return spec  # an instance: trusted to satisfy the interface
    kwargs = dict(spec)
    target = kwargs.pop("_target_", None)
    name = kwargs.pop("name", None)
    if target is not None and name is not None:
        raise ValueError(f"{kind}: give 'name' or '_target_', not both")
    cls = import_object(target) if target else resolve_class(kind, name or DEFAULTS[kind])
    accepted = inspect.signature(cls).parameters
    for key, value in defaults.items():
        if key in accepted:
            kwargs.setdefault(key, value)
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ValueError(f"{kind} {cls.__name__}: {error}") from error
