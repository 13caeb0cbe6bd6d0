"""How many parts flash-decoding cuts each sequence's KV range into (``paged_decode``).

A pure function of shapes, so two callers share it: the kernel's launcher picks the count with
it, and the simulator predicts a decode step's attention time from it (``engine.sim``: the
longest KV range one program walks is the longest sequence's over its splits)::

    programs = num_seqs * num_kv_heads      (x num_splits: the grid)
    >= 2 per SM already  ->  1 split
    else                 ->  enough to reach 2 per SM, at least 4 tiles each, a power of two
                             <= MAX_SPLITS
"""

from __future__ import annotations

MAX_SPLITS = 16
DEFAULT_BLOCK_N = 64  # KV positions a program reads per tile (the tl.dot path's default)


def num_decode_splits(
    num_sms: int, num_programs: int, max_positions: int, block_n: int = DEFAULT_BLOCK_N
) -> int:
    """Splits of each sequence's KV range for ``num_programs`` (sequences x KV heads) on a GPU
    of ``num_sms`` SMs, where a sequence spans at most ``max_positions`` (the block table's
    width): none when the programs fill the GPU, else enough to give it about two programs per
    SM, each split at least four tiles of ``block_n`` long (or the merge costs more than the
    split saves), rounded down to a power of two (a constexpr: few compiled variants)."""
    target = 2 * num_sms
    if num_programs >= target:
        return 1
    splits = min(-(-target // max(num_programs, 1)), -(-max_positions // (4 * block_n)))
    return min(MAX_SPLITS, 1 << (max(1, splits).bit_length() - 1))
