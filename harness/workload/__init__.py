"""Workloads: what requests arrive when, with which prompts and output lengths.

``build_workload(cfg, vocab_size=..., max_seq_len=...)`` is the entry point of the Hydra app.
``cfg["type"]`` picks the source; every type also takes the common keys. Defaults in brackets.

- common: ``name`` [type or type:file], ``seed`` [0], ``concurrency`` [None: open loop; N:
  closed loop, N requests in flight, arrival times all 0], and the transforms (transforms.py,
  applied in this order): ``start``, ``duration``, ``max_requests``, ``rate`` | ``time_scale``,
  ``max_input_len``, ``max_output_len`` [all None]; fitting to ``max_seq_len`` always applies.
- ``synthetic``: ``num_requests``, ``input_len``, ``output_len`` (an int or a length dist, see
  lengths.py), ``arrival`` [{}: all at t=0; else {process, rate, burstiness}, see arrivals.py].
- ``shared_prefix``: ``num_groups``, ``requests_per_group``, ``system_prompt_len``,
  ``question_len``, ``output_len``, ``arrival`` [{}], ``order`` [round_robin | random].
- ``azure``: ``path``. ``burstgpt``: ``path``, ``model`` [None: all]. ``mooncake``: ``path``,
  ``block_size`` [512]. ``sharegpt``: ``path``, ``num_requests`` [None: all], ``arrival`` [{}];
  needs ``tokenizer``.

Unknown type or key: ``WorkloadError`` naming it and listing the allowed ones (Hydra's
``_name_``-style keys, e.g. ``_target_``, are ignored).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .arrivals import all_at_once, arrival_times, constant, gamma, poisson
from .base import RequestDraft, RequestSpec, Workload, WorkloadError, token_tuple
from .lengths import Empirical, Fixed, LengthDist, LogNormal, Uniform, length_dist
from .synthetic import random_prompts, shared_prefix, synthetic
from .traces import (
    TraceRead,
    block_prompt,
    parse_timestamp,
    read_azure,
    read_burstgpt,
    read_mooncake,
    read_sharegpt,
    read_trace_rows,
)
from .transforms import TRANSFORM_KEYS, Transforms, apply_transforms

__all__ = [
    "COMMON_KEYS",
    "TYPE_KEYS",
    "Empirical",
    "Fixed",
    "LengthDist",
    "LogNormal",
    "RequestDraft",
    "RequestSpec",
    "TraceRead",
    "Transforms",
    "Uniform",
    "Workload",
    "WorkloadError",
    "all_at_once",
    "apply_transforms",
    "arrival_times",
    "block_prompt",
    "build_workload",
    "constant",
    "gamma",
    "length_dist",
    "parse_timestamp",
    "poisson",
    "read_azure",
    "read_burstgpt",
    "read_mooncake",
    "read_sharegpt",
    "read_trace_rows",
    "shared_prefix",
    "synthetic",
]

COMMON_KEYS = ("type", "name", "seed", "concurrency", *TRANSFORM_KEYS)
TYPE_KEYS: dict[str, tuple[str, ...]] = {
    "synthetic": ("num_requests", "input_len", "output_len", "arrival"),
    "shared_prefix": (
        "num_groups",
        "requests_per_group",
        "system_prompt_len",
        "question_len",
        "output_len",
        "arrival",
        "order",
    ),
    "azure": ("path",),
    "mooncake": ("path", "block_size"),
    "burstgpt": ("path", "model"),
    "sharegpt": ("path", "num_requests", "arrival"),
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "synthetic": ("num_requests", "input_len", "output_len"),
    "shared_prefix": (
        "num_groups",
        "requests_per_group",
        "system_prompt_len",
        "question_len",
        "output_len",
    ),
}


def _plain(value: Any) -> Any:
    """Nested mappings (e.g. OmegaConf's DictConfig) as plain dicts."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _check_keys(cfg: Mapping[str, Any]) -> str:
    kind = cfg.get("type")
    if kind not in TYPE_KEYS:
        raise WorkloadError(f"unknown workload type {kind!r}; allowed: {', '.join(TYPE_KEYS)}")
    allowed = (*COMMON_KEYS, *TYPE_KEYS[kind])
    for key in cfg:
        if key not in allowed:
            raise WorkloadError(
                f"unknown key {key!r} for workload type {kind}; allowed: {', '.join(allowed)}"
            )
    for key in _REQUIRED.get(kind, ("path",)):
        if cfg.get(key) is None:
            raise WorkloadError(f"workload type {kind} needs {key!r}")
    return kind


def _drafts(
    kind: str, cfg: Mapping[str, Any], vocab_size: int, seed: int, tokenizer: object | None
) -> tuple[list[RequestDraft], dict[str, object]]:
    """The source's drafts and the reader's metadata."""
    if kind == "synthetic":
        drafts = synthetic(
            int(cfg["num_requests"]),
            cfg["input_len"],
            cfg["output_len"],
            cfg.get("arrival"),
            seed=seed,
        )
        return drafts, {}
    if kind == "shared_prefix":
        drafts = shared_prefix(
            int(cfg["num_groups"]),
            int(cfg["requests_per_group"]),
            int(cfg["system_prompt_len"]),
            cfg["question_len"],
            cfg["output_len"],
            vocab_size,
            arrival=cfg.get("arrival"),
            order=str(cfg.get("order", "round_robin")),
            seed=seed,
        )
        return drafts, {}
    path = str(cfg["path"])
    if kind == "azure":
        read = read_azure(path)
    elif kind == "mooncake":
        read = read_mooncake(path, int(cfg.get("block_size", 512)))
    elif kind == "burstgpt":
        read = read_burstgpt(path, cfg.get("model"))
    else:
        n = cfg.get("num_requests")
        read = read_sharegpt(path, tokenizer, None if n is None else int(n))
        # No timestamps in ShareGPT: arrivals come from the configured process, on their own
        # stream so that they do not depend on how many conversations were read.
        times = arrival_times(len(read.rows), cfg.get("arrival"), np.random.default_rng([seed, 2]))
        read.rows = [
            RequestDraft(float(t), d.input_len, d.output_len, d.source, d.prompt)
            for t, d in zip(times, read.rows, strict=True)
        ]
    return read.rows, read.metadata


def _materialize(
    drafts: list[RequestDraft], vocab_size: int, seed: int, block_size: int, closed_loop: bool
) -> tuple[RequestSpec, ...]:
    """Prompts for the drafts: explicit ones cut to length, Mooncake blocks, else random ids (one
    seeded stream, in arrival order)."""
    random_idx = [k for k, d in enumerate(drafts) if d.prompt is None and d.hash_ids is None]
    rng = np.random.default_rng([seed, 1])
    generated = random_prompts([drafts[k].input_len for k in random_idx], vocab_size, rng)
    prompts: list[tuple[int, ...] | None] = [None] * len(drafts)
    for k, p in zip(random_idx, generated, strict=True):
        prompts[k] = p
    specs = []
    for d, p in zip(drafts, prompts, strict=True):
        if d.prompt is not None:
            p = d.prompt[: d.input_len]
            if len(p) < d.input_len:
                raise WorkloadError(f"{d.source}: prompt shorter than its input_len")
        elif d.hash_ids is not None:
            p = token_tuple(block_prompt(d.hash_ids, d.input_len, block_size, vocab_size, seed))
        arrival = 0.0 if closed_loop else d.arrival_time
        specs.append(RequestSpec(arrival, p, d.output_len, d.source))  # type: ignore[arg-type]
    return tuple(specs)


def _stats(specs: tuple[RequestSpec, ...], closed_loop: bool) -> dict[str, object]:
    ins = [s.num_prompt_tokens for s in specs]
    outs = [s.max_new_tokens for s in specs]
    span = specs[-1].arrival_time - specs[0].arrival_time
    return {
        "num_requests": len(specs),
        "total_input_tokens": sum(ins),
        "total_output_tokens": sum(outs),
        "input_len_mean": statistics.fmean(ins),
        "input_len_median": statistics.median(ins),
        "input_len_max": max(ins),
        "output_len_mean": statistics.fmean(outs),
        "output_len_median": statistics.median(outs),
        "output_len_max": max(outs),
        "arrival_span_s": span,
        "mean_rate": (len(specs) - 1) / span if span > 0 and not closed_loop else None,
    }


def build_workload(
    cfg: Mapping[str, Any], *, vocab_size: int, max_seq_len: int, tokenizer: object | None = None
) -> Workload:
    """The workload a config describes (keys in the module docstring), fitted to a model with
    ``vocab_size`` tokens and ``max_seq_len`` positions (prompt + output). Deterministic given
    the config: the same ``seed`` gives the same arrivals and token ids."""
    # Hydra's own keys (``_target_`` and the like) say how to build, not what: ignored.
    cfg = {k: v for k, v in _plain(cfg).items() if not (k.startswith("_") and k.endswith("_"))}
    kind = _check_keys(cfg)
    seed = int(cfg.get("seed", 0))
    concurrency = cfg.get("concurrency")
    if concurrency is not None:
        concurrency = int(concurrency)
        if concurrency < 1:
            raise WorkloadError(f"concurrency must be >= 1, got {concurrency}")
        if cfg.get("arrival"):
            raise WorkloadError("give 'arrival' (open loop) or 'concurrency' (closed), not both")
    transforms = Transforms(**{k: cfg[k] for k in TRANSFORM_KEYS if cfg.get(k) is not None})

    drafts, meta = _drafts(kind, cfg, vocab_size, seed, tokenizer)
    drafts, transform_meta = apply_transforms(
        drafts, transforms, max_seq_len, closed_loop=concurrency is not None
    )
    closed = concurrency is not None
    specs = _materialize(drafts, vocab_size, seed, int(cfg.get("block_size", 512)), closed)

    default_name = kind if "path" not in cfg else f"{kind}:{Path(str(cfg['path'])).name}"
    metadata: dict[str, object] = {"type": kind, "seed": seed, **meta, **transform_meta}
    metadata.update(_stats(specs, closed))
    return Workload(
        name=str(cfg.get("name") or default_name),
        requests=specs,
        concurrency=concurrency,
        metadata=metadata,
    )
