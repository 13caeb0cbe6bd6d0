"""The physical block pool: reference counts, an eviction-ordered free list, a prefix-hash map.

In the style of vLLM v1's ``BlockPool``. Every block is either *used* (``ref_count > 0``, held by
at least one request) or *free* (``ref_count == 0``, in the free list). A free block may still be
*cached*: it carries the hash of the full block of tokens it holds and can be found by that hash
until it is allocated for something else (evicted). The free list is the eviction order::

    front (evicted first)                                         end (evicted last)
    [ uncached blocks ...   | cached blocks, least recently freed ... most recently freed ]
      ^ allocate() pops here                                    ^ cached blocks freed go here

Uncached free blocks hold nothing of value, so they go to the front and are reused first.
A request's blocks are freed tail-first, so its last block lands nearer the front than its first:
the head of a prefix (the part other requests most likely share) stays cached longest.

The pool knows nothing of requests or tokens; ``PagedKVCacheManager`` owns those.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from engine.kv_cache import KVCacheExhaustedError


class BlockPool:
    """``num_blocks`` blocks, all free at first, in id order ``0..num_blocks-1``.

    Invariants (see ``check_integrity``): a block is in ``free_block_ids`` iff its ref count is
    0; ``cached_block_ids[h] == b`` iff ``block_hashes[b] == h``.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"BlockPool.num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts: list[int] = [0] * num_blocks
        # The hash of the full block each block holds while it is findable, else None.
        self.block_hashes: list[int | None] = [None] * num_blocks
        # Free blocks in eviction order (values unused: an ordered set with O(1) move/remove).
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached_block_ids: dict[int, int] = {}  # block hash -> block id
        # Bumped whenever cached_block_ids changes: lets callers memoize prefix matches.
        self.num_cache_changes = 0

    # ---- derived counts ---------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_block_ids)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached_block_ids)

    # ---- operations -------------------------------------------------------------------------
    def get_cached_block(self, block_hash: int) -> int | None:
        """The block holding the full block with ``block_hash``, or None. Does not touch it."""
        return self.cached_block_ids.get(block_hash)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` blocks from the front of the free list, each with ref count 1.

        A taken block that was cached is evicted: its hash no longer finds it.
        Raises ``KVCacheExhaustedError`` (taking nothing) if fewer blocks are free.
        """
        if num_blocks > len(self.free_block_ids):
            raise KVCacheExhaustedError(
                f"BlockPool.allocate: {num_blocks} blocks asked, "
                f"{len(self.free_block_ids)} of {self.num_blocks} free"
            )
        block_ids: list[int] = []
        for _ in range(num_blocks):
            block_id, _ = self.free_block_ids.popitem(last=False)
            block_hash = self.block_hashes[block_id]
            if block_hash is not None:
                del self.cached_block_ids[block_hash]
                self.block_hashes[block_id] = None
                self.num_cache_changes += 1
            self.ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add a reference to each (cached) block; a free one leaves the free list, still cached."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self.free_block_ids[block_id]
            self.ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block, in the order given (callers pass a request's blocks
        tail-first). A block reaching 0 joins the free list: at the end if cached (evicted last),
        at the front if not (reused first)."""
        for block_id in block_ids:
            ref_count = self.ref_counts[block_id] - 1
            assert ref_count >= 0, f"block {block_id} freed more often than referenced"
            self.ref_counts[block_id] = ref_count
            if ref_count == 0:
                self.free_block_ids[block_id] = None  # a new key goes to the end
                if self.block_hashes[block_id] is None:
                    self.free_block_ids.move_to_end(block_id, last=False)

    def cache_block(self, block_id: int, block_hash: int) -> bool:
        """Make ``block_id`` findable by ``block_hash``. If another block already holds that hash,
        keep the existing entry (``block_id`` stays private) and return False."""
        if block_hash in self.cached_block_ids:
            return self.cached_block_ids[block_hash] == block_id
        assert self.block_hashes[block_id] is None, f"block {block_id} is already cached"
        self.cached_block_ids[block_hash] = block_id
        self.block_hashes[block_id] = block_hash
        self.num_cache_changes += 1
        return True

    # ---- checks -----------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise AssertionError naming the first inconsistency between counts, list and map."""
        for block_id in self.free_block_ids:
            assert 0 <= block_id < self.num_blocks, f"free list holds unknown block {block_id}"
            assert self.ref_counts[block_id] == 0, (
                f"block {block_id} is in the free list with ref count {self.ref_counts[block_id]}"
            )
        for block_id, ref_count in enumerate(self.ref_counts):
            assert ref_count >= 0, f"block {block_id} has negative ref count {ref_count}"
            if ref_count == 0:
                assert block_id in self.free_block_ids, (
                    f"block {block_id} has ref count 0 but is not in the free list"
                )
        num_used = sum(1 for ref_count in self.ref_counts if ref_count > 0)
        assert self.num_free_blocks + num_used == self.num_blocks, (
            f"free ({self.num_free_blocks}) + used ({num_used}) != num_blocks ({self.num_blocks})"
        )
        for block_hash, block_id in self.cached_block_ids.items():
            assert 0 <= block_id < self.num_blocks, f"hash map points to unknown block {block_id}"
            assert self.block_hashes[block_id] == block_hash, (
                f"hash map entry {block_hash} -> block {block_id}, but the block carries hash "
                f"{self.block_hashes[block_id]}"
            )
        for block_id, block_hash in enumerate(self.block_hashes):
            if block_hash is not None:
                assert self.cached_block_ids.get(block_hash) == block_id, (
                    f"block {block_id} carries hash {block_hash} that the hash map does not "
                    f"map to it"
                )
