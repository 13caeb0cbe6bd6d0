"""The KV-cache manager interface: block accounting for schedulers, block tables for the model.

The pool is ``num_blocks`` blocks of ``tokens_per_block`` token slots. A token's slot is
``block_id * tokens_per_block + offset``; a request's block table lists its block ids in token
order::

    request tokens: t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9
    block table:    [   7       ,    2        ,  5   ]     (tokens_per_block = 4)
    slot of t9:     5 * 4 + 1 = 21

Schedulers ask "does it fit" inside a *scheduling transaction*, a what-if copy of the free-block
count that the real pool is not touched by::

    kv.start_scheduling()
    need = kv.get_needed_blocks_one_step(req)        # or get_remaining_blocks_to_completion
    if kv.scheduling_has_free_blocks(need):
        kv.scheduling_add_sequence(req, need)        # reserve
    kv.scheduling_remove_sequence(victim)            # what if the victim's blocks were freed?

Blocks shared through prefix reuse are counted once: a pending request's need excludes matched
blocks that are in use (or reserved earlier in the same transaction), and removing a sequence
frees only blocks that no one else holds or reserved.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.request import Request
from engine.resource_manager import BaseResourceManager


@dataclass(frozen=True)
class KVCacheStats:
    """TensorRT-LLM's KV-cache stats. Counters (alloc/reused/missed) are cumulative."""

    max_num_blocks: int
    free_num_blocks: int  # includes cached blocks that no request holds (evictable)
    used_num_blocks: int
    tokens_per_block: int
    alloc_total_blocks: int  # blocks given to requests: reused + new
    alloc_new_blocks: int
    reused_blocks: int
    missed_blocks: int
    num_cached_blocks: int = 0  # blocks findable by prefix hash (held or free)

    @property
    def cache_hit_rate(self) -> float:
        looked_up = self.reused_blocks + self.missed_blocks
        return self.reused_blocks / looked_up if looked_up else 0.0

    @property
    def utilization(self) -> float:
        return self.used_num_blocks / self.max_num_blocks if self.max_num_blocks else 0.0


class KVCacheManager(BaseResourceManager):
    """A paged KV cache. Contract for implementations:

    - ``prepare_resources(batch)``: every scheduled context request that holds no blocks yet gets
      blocks for its whole current context (``num_tokens``); with block reuse, its longest cached
      prefix of full blocks (at most ``num_tokens - 1`` tokens, so one token is always computed)
      is shared instead of allocated, and ``request.num_computed_tokens`` /
      ``num_cached_tokens`` advance by the hit (its ``context_chunk_size`` is clipped to what is
      left). Every generation request gets one more block when its next token starts a block.
      Raises ``KVCacheExhaustedError`` if the blocks are not there (a scheduler bug).
    - ``update_resources(batch)``: after the step's counters advanced; with block reuse, full
      blocks whose tokens are all computed become findable by their hash (chained to the parent
      block's hash).
    - ``free_resources(request)``: drop the request's references; blocks no one holds return to
      the free list (cached ones stay findable until evicted, least recently used first).
    - ``free + used == max`` at all times (``check_integrity``).
    - ``steady_decode``: declare True if, for decoding requests, ``prepare_resources`` changes
      nothing unless a request's next token starts a block (it then allocates exactly one for
      it) and ``update_resources`` changes nothing unless a step fills a block. The simulated
      engine then calls them only on such steps (``engine.sim.fast_forward``).
    """

    tokens_per_block: int
    num_blocks: int
    enable_block_reuse: bool
    steady_decode: bool = False

    # ---- for schedulers ---------------------------------------------------------------------
    @property
    @abstractmethod
    def num_free_blocks(self) -> int: ...

    @abstractmethod
    def start_scheduling(self) -> None: ...

    @abstractmethod
    def scheduling_has_free_blocks(self, num_blocks: int) -> bool: ...

    @abstractmethod
    def scheduling_add_sequence(self, request: Request, num_blocks: int) -> None:
        """Reserve ``num_blocks`` for ``request`` in the transaction (and its matched prefix)."""

    @abstractmethod
    def scheduling_remove_sequence(self, request: Request) -> None:
        """Pretend ``request`` was paused: its blocks that no one else holds become free."""

    @abstractmethod
    def get_needed_blocks_one_step(self, request: Request) -> int:
        """Blocks ``request`` must be given to run its next step."""

    @abstractmethod
    def get_remaining_blocks_to_completion(self, request: Request) -> int:
        """Blocks ``request`` must still be given to reach ``max_num_tokens`` (worst case)."""

    @abstractmethod
    def probe_prefix_match_length(self, token_ids: list[int]) -> int:
        """Tokens of ``token_ids`` a new request would find cached now (full blocks)."""

    # ---- for the model engine ---------------------------------------------------------------
    @abstractmethod
    def get_block_ids(self, request: Request) -> list[int]:
        """``request``'s block table (a copy the caller may keep), in token order."""

    def block_id_rows(self, requests: Sequence[Request]) -> list[Sequence[int]]:
        """The block tables of ``requests``, for reading within this step only: a manager may
        return its own lists rather than copies (the model engine reads 256 of them a step)."""
        return [self.get_block_ids(r) for r in requests]

    @abstractmethod
    def allocate_pool(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        free_bytes: int | None = None,
    ) -> None:
        """Create the KV tensors (``kv_pool``) once the model is known. A pool sized from free
        memory uses ``free_bytes`` when given (the simulated engine passes its profile's), else
        the device's free memory. On the ``meta`` device nothing is allocated: the simulated
        engine only counts blocks."""

    kv_pool: (
        torch.Tensor | None
    )  # [num_layers, 2, num_blocks, tokens_per_block, num_kv_heads, head_dim]

    # ---- for statistics and tests -----------------------------------------------------------
    @abstractmethod
    def get_kv_cache_stats(self) -> KVCacheStats: ...

    @abstractmethod
    def check_integrity(self) -> None:
        """Raise AssertionError if the block accounting is inconsistent."""

    def get_max_resource_count(self) -> int:
        return self.num_blocks


class KVCacheExhaustedError(RuntimeError):
    """Allocation found too few free blocks: the scheduler admitted more than fits."""
