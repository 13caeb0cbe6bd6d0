"""A paged KV cache with TensorRT-LLM-style allocation and vLLM-v1-style prefix reuse.

Allocation (as in TensorRT-LLM): a context request's first scheduled step gets blocks for its
whole current context at once; a generation request gets one more block when the token it
computes starts a block. A request holds ``ceil(num_tokens / tokens_per_block)`` blocks while it
runs, so the only requests that ask for blocks in a step are new contexts and generations at a
block boundary.

Prefix reuse (``enable_block_reuse``): a full block of tokens is identified by a hash chained from
the first block, so equal content under a different prefix is a different block::

    tokens:  a b c d | e f g h | i j        (tokens_per_block = 4)
    hash:    h0 = hash((None, (a, b, c, d)))
             h1 = hash((h0,   (e, f, g, h)))
             (i j is not full: never cached)

Blocks become findable (``update_resources``) once all their tokens are computed; a new context
shares the longest chain of findable blocks, capped at ``num_tokens - 1`` tokens so that at least
one token is computed and the step has logits to sample from. Hashes are Python's ``hash`` of
int tuples: fast and deterministic within a process; a collision (about 2**-64 per pair) would
share a wrong block, which a research harness accepts.

Blocks are counted without any tensor: ``kv_pool`` exists only after ``allocate_pool`` (a
simulator never calls it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch

from engine.kv_cache import KVCacheExhaustedError, KVCacheManager, KVCacheStats
from engine.request import Request, num_blocks_for
from engine.scheduler import SchedulerOutput
from policies.kv_cache.block_pool import BlockPool

# Pool size on CPU when neither num_blocks nor max_tokens is given (no free-memory query there).
DEFAULT_CPU_MAX_TOKENS = 16384


class PagedKVCacheManager(KVCacheManager):
    """Paged KV cache over a ``BlockPool``.

    Args:
        tokens_per_block: token slots per block; a power of two.
        num_blocks: pool size in blocks. Takes precedence over ``max_tokens``.
        max_tokens: pool size in tokens (rounded up to whole blocks).
        free_gpu_memory_fraction: with neither size given, ``allocate_pool`` sizes the pool to
            this fraction of free CUDA memory (``torch.cuda.mem_get_info``); on a non-CUDA
            device it uses ``DEFAULT_CPU_MAX_TOKENS`` tokens instead. Until then the block count
            is unknown and every scheduling method raises.
        enable_block_reuse: share cached full prefix blocks between requests.
    """

    steady_decode = True  # see the base class: the simulated engine may skip repeated steps

    def __init__(
        self,
        tokens_per_block: int = 32,
        num_blocks: int | None = None,
        max_tokens: int | None = None,
        free_gpu_memory_fraction: float = 0.9,
        enable_block_reuse: bool = False,
    ) -> None:
        if tokens_per_block < 1 or tokens_per_block & (tokens_per_block - 1):
            raise ValueError(
                "PagedKVCacheManager.tokens_per_block must be a power of two >= 1 "
                f"(1, 2, 4, ..., 32, 64, ...), got {tokens_per_block}"
            )
        if num_blocks is not None and num_blocks < 1:
            raise ValueError(
                f"PagedKVCacheManager.num_blocks must be >= 1 or None, got {num_blocks}"
            )
        if max_tokens is not None and max_tokens < tokens_per_block:
            raise ValueError(
                "PagedKVCacheManager.max_tokens must be >= tokens_per_block "
                f"({tokens_per_block}) or None, got {max_tokens}"
            )
        if not 0.0 < free_gpu_memory_fraction <= 1.0:
            raise ValueError(
                "PagedKVCacheManager.free_gpu_memory_fraction must be in (0, 1], "
                f"got {free_gpu_memory_fraction}"
            )
        self.tokens_per_block = tokens_per_block
        self.max_tokens = max_tokens
        self.free_gpu_memory_fraction = free_gpu_memory_fraction
        self.enable_block_reuse = enable_block_reuse
        self.kv_pool: torch.Tensor | None = None

        # Per request: the blocks it holds (token order), its full-block hashes (computed
        # lazily, kept across pauses since tokens are only ever appended; dropped once
        # finished), and how many of its leading blocks update_resources has processed.
        self._block_ids: dict[Request, list[int]] = {}
        self._block_hashes: dict[Request, list[int]] = {}
        self._num_registered_blocks: dict[Request, int] = {}
        # Prefix-match memo of requests holding no blocks: (num_cache_changes, num_tokens, ids).
        self._matches: dict[Request, tuple[int, int, list[int]]] = {}

        # Scheduling transaction: a what-if free count and per-block reference deltas.
        self._scheduling_num_free: int | None = None
        self._scheduling_ref_delta: dict[int, int] = {}

        # Cumulative stats.
        self._num_alloc_new_blocks = 0
        self._num_reused_blocks = 0
        self._num_missed_blocks = 0

        self._pool: BlockPool | None = None
        if num_blocks is None and max_tokens is not None:
            num_blocks = math.ceil(max_tokens / tokens_per_block)
        if num_blocks is not None:
            self._pool = BlockPool(num_blocks)

    # ---- pool size --------------------------------------------------------------------------
    @property
    def is_sized(self) -> bool:
        """Whether the block count is known (else only ``allocate_pool`` may be called)."""
        return self._pool is not None

    @property
    def pool(self) -> BlockPool:
        if self._pool is None:
            raise RuntimeError(
                "PagedKVCacheManager: the number of blocks is not known yet; pass num_blocks or "
                "max_tokens, or call allocate_pool() to size the pool from free GPU memory"
            )
        return self._pool

    @property
    def num_blocks(self) -> int:  # type: ignore[override]
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used_blocks

    def allocate_pool(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        free_bytes: int | None = None,
    ) -> None:
        """Create ``kv_pool`` zeros ``[num_layers, 2 (K, V), num_blocks, tokens_per_block,
        num_kv_heads, head_dim]``, first sizing the pool if no size was given."""
        device = torch.device(device)
        bytes_per_block = (
            num_layers * 2 * self.tokens_per_block * num_kv_heads * head_dim * dtype.itemsize
        )
        if self._pool is None:
            if free_bytes is None and device.type == "cuda":
                free_bytes, _ = torch.cuda.mem_get_info(device)
            if free_bytes is not None:
                num_blocks = int(free_bytes * self.free_gpu_memory_fraction) // bytes_per_block
                if num_blocks < 1:
                    raise RuntimeError(
                        "PagedKVCacheManager: free_gpu_memory_fraction="
                        f"{self.free_gpu_memory_fraction} of free "
                        f"GPU memory ({free_bytes} bytes) holds no block of {bytes_per_block} "
                        "bytes"
                    )
            elif device.type == "meta":
                raise ValueError(
                    "PagedKVCacheManager: a simulated pool needs a size: give num_blocks or "
                    "max_tokens, or a profile with the device's free memory"
                )
            else:
                num_blocks = math.ceil(DEFAULT_CPU_MAX_TOKENS / self.tokens_per_block)
            self._pool = BlockPool(num_blocks)
        self.kv_pool = torch.zeros(
            (
                num_layers,
                2,
                self.pool.num_blocks,
                self.tokens_per_block,
                num_kv_heads,
                head_dim,
            ),
            dtype=dtype,
            device=device,
        )

    # ---- prefix hashing ---------------------------------------------------------------------
    def _block_tokens(self, request: Request, block_index: int) -> tuple[int, ...]:
        """Tokens of the request's full block ``block_index``, without building all_token_ids."""
        start = block_index * self.tokens_per_block
        end = start + self.tokens_per_block
        prompt = request.prompt_token_ids
        num_prompt = len(prompt)
        if end <= num_prompt:
            return tuple(prompt[start:end])
        output = request.output_token_ids
        # The block straddles (or lies past) the prompt's end: the rest comes from the output.
        return tuple(prompt[start:end]) + tuple(
            output[max(start - num_prompt, 0) : end - num_prompt]
        )

    def _block_hash(self, request: Request, block_index: int) -> int:
        """Hash of the request's full block ``block_index`` (computed once, chained)."""
        hashes = self._block_hashes.get(request)
        if hashes is None:
            hashes = self._block_hashes[request] = []
        while len(hashes) <= block_index:
            parent = hashes[-1] if hashes else None
            hashes.append(hash((parent, self._block_tokens(request, len(hashes)))))
        return hashes[block_index]

    def _match_prefix(self, request: Request) -> list[int]:
        """Cached blocks of the request's longest findable prefix, at most ``num_tokens - 1``
        tokens. Does not touch them. Empty without block reuse.

        Memoized per request until the hash map or the request's length changes, so a
        scheduler's need/reserve calls and the following prepare match once per step.
        """
        if not self.enable_block_reuse:
            return []
        pool = self.pool
        num_tokens = request.num_tokens
        memo = self._matches.get(request)
        if memo is not None and memo[0] == pool.num_cache_changes and memo[1] == num_tokens:
            return memo[2]
        cached_block_ids = pool.cached_block_ids
        num_max_blocks = (num_tokens - 1) // self.tokens_per_block
        # Look up the hashes computed so far in one C-level pass, cut at the first miss; if all
        # hit, extend the chain (hashing new blocks) while it keeps hitting.
        hashes = self._block_hashes.get(request, [])
        matched: list[int | None] = list(map(cached_block_ids.get, hashes[:num_max_blocks]))
        if None in matched:
            del matched[matched.index(None) :]
        else:
            for block_index in range(len(matched), num_max_blocks):
                block_id = cached_block_ids.get(self._block_hash(request, block_index))
                if block_id is None:
                    break
                matched.append(block_id)
        match = cast(list[int], matched)  # no None left
        self._matches[request] = (pool.num_cache_changes, num_tokens, match)
        return match

    def probe_prefix_match_length(self, token_ids: list[int]) -> int:
        """Tokens (whole blocks) of ``token_ids`` a new request would find cached now."""
        if not self.enable_block_reuse:
            return 0
        tpb = self.tokens_per_block
        cached_block_ids = self.pool.cached_block_ids
        parent: int | None = None
        num_matched = 0
        for start in range(0, len(token_ids) - tpb + 1, tpb):
            parent = hash((parent, tuple(token_ids[start : start + tpb])))
            if parent not in cached_block_ids:
                break
            num_matched += 1
        return num_matched * tpb

    # ---- scheduling transaction -------------------------------------------------------------
    def start_scheduling(self) -> None:
        self._scheduling_num_free = self.pool.num_free_blocks
        self._scheduling_ref_delta = {}

    def _scheduling_free(self) -> int:
        if self._scheduling_num_free is None:
            raise RuntimeError("PagedKVCacheManager: call start_scheduling() first")
        return self._scheduling_num_free

    def _num_matched_in_use(self, matched_block_ids: list[int]) -> int:
        """Matched blocks that someone holds or reserved in the transaction: shared, not needed.
        Free matched blocks must still be taken from the free list, so they count as needed."""
        ref_counts = self.pool.ref_counts
        delta = self._scheduling_ref_delta
        return sum(
            1 for block_id in matched_block_ids if ref_counts[block_id] + delta.get(block_id, 0) > 0
        )

    def _num_blocks_to_give(self, request: Request, num_tokens: int) -> int:
        """Blocks from the free list for the request to hold ``num_tokens`` tokens."""
        held = self._block_ids.get(request)
        if held:  # the per-step hot path: running requests
            num_needed = -(-num_tokens // self.tokens_per_block) - len(held)
            return num_needed if num_needed > 0 else 0
        total = num_blocks_for(num_tokens, self.tokens_per_block)
        return total - self._num_matched_in_use(self._match_prefix(request))

    def get_needed_blocks_one_step(self, request: Request) -> int:
        """New context: its whole context less shared in-use prefix blocks; started context: 0;
        generation: 1 when its token starts a block, else 0."""
        return self._num_blocks_to_give(request, request.num_tokens)

    def get_remaining_blocks_to_completion(self, request: Request) -> int:
        """As ``get_needed_blocks_one_step`` but up to ``max_num_tokens`` (worst case)."""
        return self._num_blocks_to_give(request, request.max_num_tokens)

    def scheduling_has_free_blocks(self, num_blocks: int) -> bool:
        return self._scheduling_free() >= num_blocks

    def scheduling_add_sequence(self, request: Request, num_blocks: int) -> None:
        """Reserve ``num_blocks`` free blocks; a request holding none also reserves (adds a
        reference to) its matched prefix, so later requests see those blocks as in use."""
        self._scheduling_num_free = self._scheduling_free() - num_blocks
        if not self._block_ids.get(request):
            delta = self._scheduling_ref_delta
            for block_id in self._match_prefix(request):
                delta[block_id] = delta.get(block_id, 0) + 1

    def scheduling_remove_sequence(self, request: Request) -> None:
        """Drop the references of the blocks the request holds; those no one else holds or
        reserved become free. Blocks reserved for it earlier in this transaction (by
        ``scheduling_add_sequence``) stay reserved, as in TensorRT-LLM: a scheduler that
        un-reserves a victim it had admitted this step accounts for that itself."""
        num_free = self._scheduling_free()
        ref_counts = self.pool.ref_counts
        delta = self._scheduling_ref_delta
        for block_id in self._block_ids.get(request, ()):
            block_delta = delta.get(block_id, 0) - 1
            delta[block_id] = block_delta
            if ref_counts[block_id] + block_delta == 0:
                num_free += 1
        self._scheduling_num_free = num_free

    # ---- per-step resource management -------------------------------------------------------
    def prepare_resources(self, batch: SchedulerOutput) -> None:
        """Give every scheduled request the blocks its step needs (see the module docstring).

        Two phases, so a free cached block matched by one new context cannot be evicted by
        another request's allocation in the same step: first every new context takes its
        matched prefix, then all new blocks are allocated. The whole step's need is checked
        before anything changes: on ``KVCacheExhaustedError`` no state was touched.
        """
        pool = self.pool
        tpb = self.tokens_per_block
        block_ids_of = self._block_ids
        needs: list[tuple[Request, int]] = []  # requests given new blocks, and how many
        num_new = 0
        matches: dict[Request, list[int]] = {}
        if batch.is_repeat:
            # The last step's decodes one token further (``SchedulerOutput.is_repeat``): only a
            # new token that starts a block needs one (the ``steady_decode`` contract).
            # Derived from the counters, not kept from scheduling: the simulator's fast-forward
            # prepares one batch for several steps.
            needs = [(r, 1) for r in batch.generation_requests if r.num_computed_tokens % tpb == 0]
            num_new = len(needs)
        else:
            new_contexts = [r for r in batch.context_requests if not block_ids_of.get(r)]
            matches = {r: self._match_prefix(r) for r in new_contexts}
            # Check first: blocks leaving the free list = new blocks + distinct matched free
            # blocks. Most running requests need nothing; keep only those that do.
            for request in batch.scheduled_requests:
                held = matches[request] if request in matches else block_ids_of.get(request, ())
                num_needed = -(-request.num_tokens // tpb) - len(held)
                if num_needed > 0:
                    needs.append((request, num_needed))
                    num_new += num_needed
        num_free_matched = len(
            {b for match in matches.values() for b in match if pool.ref_counts[b] == 0}
        )
        if num_new + num_free_matched > pool.num_free_blocks:
            raise KVCacheExhaustedError(
                f"KV cache exhausted: the step needs {num_new + num_free_matched} free blocks "
                f"({num_new} new + {num_free_matched} free cached prefix blocks), but only "
                f"{pool.num_free_blocks} of {pool.num_blocks} are free; the scheduler admitted "
                "more than fits"
            )

        # Phase 1: new contexts take their matched prefixes.
        for request, match in matches.items():
            self._matches.pop(request, None)
            pool.touch(match)
            block_ids_of[request] = list(match)
            self._num_registered_blocks[request] = len(match)
            self._num_reused_blocks += len(match)
            if match:
                num_hit_tokens = len(match) * tpb
                request.num_computed_tokens += num_hit_tokens
                request.num_cached_tokens += num_hit_tokens
                request.context_chunk_size = min(
                    request.context_chunk_size, request.num_tokens - request.num_computed_tokens
                )

        # Phase 2: new blocks for contexts (rest of the context) and generations (boundary).
        for request, num_needed in needs:
            block_ids = block_ids_of.get(request)
            if block_ids is None:
                # Scheduled without ever getting blocks as a context (the executor skipped the
                # context step): give it what its tokens need all the same.
                block_ids = block_ids_of[request] = []
                self._num_registered_blocks[request] = 0
            block_ids.extend(pool.allocate(num_needed))
            self._num_alloc_new_blocks += num_needed
            if request in matches:
                self._num_missed_blocks += num_needed

    def update_resources(self, batch: SchedulerOutput) -> None:
        """Make full, fully computed blocks of the scheduled requests findable (block reuse)."""
        if not self.enable_block_reuse:
            return
        pool = self.pool
        tpb = self.tokens_per_block
        num_registered_of = self._num_registered_blocks
        for request in batch.scheduled_requests:
            num_full = request.num_computed_tokens // tpb
            num_registered = num_registered_of.get(request, 0)
            if num_full <= num_registered:  # the common case: no block completed this step
                continue
            block_ids = self._block_ids.get(request)
            if not block_ids:
                continue
            num_full = min(num_full, len(block_ids))
            for block_index in range(num_registered, num_full):
                # If another block already holds this hash, ours stays private.
                pool.cache_block(block_ids[block_index], self._block_hash(request, block_index))
            num_registered_of[request] = num_full

    def free_resources(self, request: Request) -> None:
        """Drop the request's block references, tail-first (see ``BlockPool``). Safe for a
        request holding nothing; forgets its hashes once it is finished."""
        block_ids = self._block_ids.pop(request, None)
        self._num_registered_blocks.pop(request, None)
        if block_ids:
            self.pool.free(reversed(block_ids))
        if request.is_finished:
            self._block_hashes.pop(request, None)
            self._matches.pop(request, None)

    # ---- per-request queries ----------------------------------------------------------------
    def get_block_ids(self, request: Request) -> list[int]:
        """The request's block table (a copy), in token order; empty if it holds none."""
        return list(self._block_ids.get(request, ()))

    def block_id_rows(self, requests: Sequence[Request]) -> list[Sequence[int]]:
        """The block tables themselves, no copies (read them before the next step changes
        them); a request that holds none gets an empty tuple."""
        tables = self._block_ids
        return [tables.get(r, ()) for r in requests]

    def get_needed_resource_to_completion(self, request: Request) -> int:
        return num_blocks_for(request.max_num_tokens, self.tokens_per_block)

    def reject_reason(self, request: Request) -> str | None:
        num_needed = self.get_needed_resource_to_completion(request)
        if num_needed <= self.num_blocks:
            return None
        return (
            f"request needs {num_needed} KV-cache blocks (prompt {request.num_prompt_tokens} "
            f"tokens + max_new_tokens {request.sampling_params.max_new_tokens}, "
            f"{self.tokens_per_block} tokens per block) but the pool has only "
            f"{self.num_blocks} blocks"
        )

    # ---- stats and checks -------------------------------------------------------------------
    def get_kv_cache_stats(self) -> KVCacheStats:
        pool = self.pool
        return KVCacheStats(
            max_num_blocks=pool.num_blocks,
            free_num_blocks=pool.num_free_blocks,
            used_num_blocks=pool.num_used_blocks,
            tokens_per_block=self.tokens_per_block,
            alloc_total_blocks=self._num_reused_blocks + self._num_alloc_new_blocks,
            alloc_new_blocks=self._num_alloc_new_blocks,
            reused_blocks=self._num_reused_blocks,
            missed_blocks=self._num_missed_blocks,
            num_cached_blocks=pool.num_cached_blocks,
        )

    def check_integrity(self) -> None:
        """Pool invariants, plus: each block's ref count equals the number of requests holding
        it (so references held sum to ref counts), and no request holds a block twice.
        O(num_blocks + held blocks): for tests and debugging, not per step."""
        pool = self.pool
        pool.check_integrity()
        num_holders = [0] * pool.num_blocks
        for request, block_ids in self._block_ids.items():
            assert len(set(block_ids)) == len(block_ids), (
                f"{request} holds a block twice: {block_ids}"
            )
            for block_id in block_ids:
                num_holders[block_id] += 1
        for block_id, (holders, ref_count) in enumerate(
            zip(num_holders, pool.ref_counts, strict=True)
        ):
            assert holders == ref_count, (
                f"block {block_id} has ref count {ref_count} but {holders} requests hold it"
            )
