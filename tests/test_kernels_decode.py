"""Triton KV write and paged decode attention against the torch reference.

Without CUDA the kernels run through Triton's interpreter on CPU tensors (slow: the cases are
kept small); on a CUDA machine the same tests run the compiled kernels, plus half-precision
cases.
"""

import os

import torch

# Must be set before triton.jit decorates the kernels, i.e. before kernels is imported.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

from engine.model_engine import ForwardBatch
from engine.models import attention as ref
from kernels import paged_decode_attention, write_kv

CUDA = torch.cuda.is_available()


@pytest.fixture
def device() -> str:
    return "cuda" if CUDA else "cpu"


def _pool(num_blocks, tokens_per_block, num_kv_heads, head_dim, dtype, device, contiguous=True):
    """One layer's pool, NaN-filled so that any read of an unwritten slot shows in the output.

    ``contiguous=False`` gives a permuted view (heads stored before token offsets), so every
    stride differs from the default layout.
    """
    if contiguous:
        shape = (2, num_blocks, tokens_per_block, num_kv_heads, head_dim)
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    storage = torch.full(
        (2, num_blocks, num_kv_heads, tokens_per_block, head_dim),
        float("nan"),
        dtype=dtype,
        device=device,
    )
    return storage.transpose(2, 3)


def _decode_case(
    seq_lens,
    tokens_per_block,
    num_heads,
    num_kv_heads,
    head_dim,
    dtype,
    device,
    contiguous_pool=True,
    seed=0,
):
    """Random keys for every sequence, written through shuffled blocks; returns the inputs."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // tokens_per_block) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # a few never-used (NaN) blocks
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(blocks_per_seq) + 1  # at least one padding column per row
    # Kernel table padded with out-of-range garbage (never read); the reference needs valid ids.
    table = torch.full((len(seq_lens), max_blocks), 10**9, dtype=torch.int64)
    ref_table = torch.zeros((len(seq_lens), max_blocks), dtype=torch.int64)
    pool = _pool(
        num_blocks, tokens_per_block, num_kv_heads, head_dim, dtype, device, contiguous_pool
    )
    for s, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq, strict=True)):
        ids = torch.tensor([perm.pop() for _ in range(nb)], dtype=torch.int64)
        table[s, :nb] = ids
        ref_table[s, :nb] = ids
        pos = torch.arange(n)
        slots = ids[pos // tokens_per_block] * tokens_per_block + pos % tokens_per_block
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen)
        ref.write_kv(k.to(device), v.to(device), pool, slots.to(device))
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(device, dtype)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int64, device=device)
    return query, pool, table.to(device), ref_table.to(device), seq_lens_t


def _reference(query, pool, ref_table, seq_lens, scale, sliding_window):
    n = query.shape[0]
    dev = query.device
    batch = ForwardBatch(
        input_ids=torch.zeros(n, dtype=torch.int64, device=dev),
        positions=seq_lens - 1,
        slot_mapping=torch.zeros(n, dtype=torch.int64, device=dev),
        query_start_loc=torch.arange(n + 1, dtype=torch.int64, device=dev),
        seq_lens=seq_lens,
        block_tables=ref_table,
        logits_indices=torch.arange(n, dtype=torch.int64, device=dev),
        max_query_len=1,
        max_seq_len=int(seq_lens.max()),
    )
    return ref.paged_attention(query, pool, batch, scale, sliding_window)


# (seq_lens, tokens_per_block, num_heads, num_kv_heads, head_dim, sliding_window, num_splits)
DECODE_CASES = [
    pytest.param([1, 17, 40], 16, 2, 2, 64, None, 1, id="mha-tpb16"),
    pytest.param([5, 1, 13], 4, 4, 2, 64, None, 1, id="gqa2-tpb4"),
    pytest.param([33, 70, 1], 32, 8, 2, 128, None, 1, id="gqa4-tpb32-d128"),
    pytest.param([50, 3], 16, 4, 1, 128, 20, 1, id="gqa4-window"),
    pytest.param([1, 90, 31], 16, 4, 2, 64, None, 4, id="gqa2-split4"),
    pytest.param([77, 2], 4, 2, 1, 64, 37, 3, id="gqa2-window-split3"),
    pytest.param([9, 24], 4, 2, 2, 96, None, 1, id="mha-d96"),
]


@pytest.mark.parametrize("use_dot", [False, True], ids=["sum", "dot"])
@pytest.mark.parametrize(
    "seq_lens,tokens_per_block,num_heads,num_kv_heads,head_dim,sliding_window,num_splits",
    DECODE_CASES,
)
def test_decode_matches_reference_fp32(
    device,
    use_dot,
    seq_lens,
    tokens_per_block,
    num_heads,
    num_kv_heads,
    head_dim,
    sliding_window,
    num_splits,
):
    query, pool, table, ref_table, lens = _decode_case(
        seq_lens, tokens_per_block, num_heads, num_kv_heads, head_dim, torch.float32, device
    )
    scale = head_dim**-0.5
    out = paged_decode_attention(
        query, pool, table, lens, scale, sliding_window, num_splits=num_splits, use_dot=use_dot
    )
    expected = _reference(query, pool, ref_table, lens, scale, sliding_window)
    assert out.dtype == query.dtype and out.shape == query.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_decode_strided_inputs_int32_metadata(device):
    """Non-contiguous query and pool views; int32 block tables and seq_lens; default splits."""
    query, pool, table, ref_table, lens = _decode_case(
        [6, 19], 4, 4, 2, 64, torch.float32, device, contiguous_pool=False, seed=1
    )
    wide = torch.randn(query.shape[0], query.shape[1], 3 * query.shape[2], device=device)
    wide[:, :, 64:128] = query  # query as a strided slice, like q of a fused qkv
    strided_query = wide[:, :, 64:128]
    assert not strided_query.is_contiguous() and not pool.is_contiguous()
    out = paged_decode_attention(strided_query, pool, table.int(), lens.int(), 0.125)
    expected = _reference(query, pool, ref_table, lens, 0.125, None)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_decode_split_and_no_split_agree(device):
    """More splits than tiles (empty splits) must not change the result."""
    query, pool, table, _, lens = _decode_case([3, 21], 4, 2, 1, 64, torch.float32, device, seed=2)
    one = paged_decode_attention(query, pool, table, lens, 0.125, num_splits=1)
    many = paged_decode_attention(query, pool, table, lens, 0.125, num_splits=8)
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not CUDA, reason="half precision runs on CUDA only (not in the interpreter)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("use_dot", [False, True], ids=["sum", "dot"])
@pytest.mark.parametrize("num_splits", [1, 4, None])
@pytest.mark.parametrize(
    "tokens_per_block,num_heads,num_kv_heads,head_dim,sliding_window",
    [(16, 32, 8, 128, None), (32, 8, 8, 64, None), (16, 16, 4, 128, 100)],
)
def test_decode_half_precision_cuda(
    dtype, use_dot, num_splits, tokens_per_block, num_heads, num_kv_heads, head_dim, sliding_window
):
    seq_lens = [1, 7, 300, 513, 64, 1000]
    query, pool, table, ref_table, lens = _decode_case(
        seq_lens, tokens_per_block, num_heads, num_kv_heads, head_dim, dtype, "cuda", seed=3
    )
    scale = head_dim**-0.5
    out = paged_decode_attention(
        query, pool, table, lens, scale, sliding_window, num_splits=num_splits, use_dot=use_dot
    )
    expected = _reference(query, pool, ref_table, lens, scale, sliding_window)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "num_kv_heads,head_dim,tokens_per_block,contiguous",
    [(2, 64, 16, True), (1, 128, 4, False), (3, 80, 32, False)],
)
def test_write_kv_matches_reference(device, num_kv_heads, head_dim, tokens_per_block, contiguous):
    num_blocks, num_tokens = 6, 10
    gen = torch.Generator().manual_seed(4)
    slots = torch.randperm(num_blocks * tokens_per_block, generator=gen)[:num_tokens]
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(device)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(device)
    slots = slots.to(device)
    pool = _pool(
        num_blocks, tokens_per_block, num_kv_heads, head_dim, torch.float32, device, contiguous
    )
    expected = _pool(num_blocks, tokens_per_block, num_kv_heads, head_dim, torch.float32, device)
    write_kv(key, value, pool, slots)
    ref.write_kv(key, value, expected, slots)
    # equal_nan: the untouched slots must still be NaN in both.
    torch.testing.assert_close(pool, expected, rtol=0, atol=0, equal_nan=True)


def test_write_kv_skips_negative_slots_and_writes_into_layer_view(device):
    """Padding tokens (slot < 0) write nothing; a layer slice of a bigger pool is written in
    place; strided key/value are read correctly."""
    num_layers, num_blocks, tpb, heads, dim = 3, 4, 4, 2, 64
    full = torch.zeros(2, num_layers, num_blocks, tpb, heads, dim, device=device)
    layer = full[:, 1]  # [2, blocks, tpb, heads, dim], not contiguous
    assert not layer.is_contiguous()
    kv = torch.randn(5, 2, heads, dim, device=device)
    key, value = kv[:, 0], kv[:, 1]  # strided views
    slots = torch.tensor([3, -1, 14, -5, 0], device=device, dtype=torch.int32)
    write_kv(key, value, layer, slots)

    expected = torch.zeros_like(full)
    keep = slots >= 0
    ref.write_kv(key[keep], value[keep], expected[:, 1], slots[keep].long())
    torch.testing.assert_close(full, expected, rtol=0, atol=0)
    assert full[:, [0, 2]].abs().sum() == 0  # other layers untouched


def test_write_kv_casts_to_pool_dtype(device):
    key = torch.randn(4, 2, 64, device=device)
    value = torch.randn(4, 2, 64, device=device)
    slots = torch.tensor([0, 5, 6, 11], device=device)
    pool = torch.zeros(2, 3, 4, 2, 64, dtype=torch.float16, device=device)
    expected = torch.zeros_like(pool)
    write_kv(key, value, pool, slots)
    ref.write_kv(key, value, expected, slots)
    torch.testing.assert_close(pool, expected, rtol=0, atol=0)


@pytest.mark.skipif(not CUDA, reason="bfloat16 casts run on CUDA only")
def test_write_kv_bf16_pool_cuda():
    key = torch.randn(64, 8, 128, device="cuda")
    value = torch.randn(64, 8, 128, device="cuda")
    slots = torch.randperm(16 * 16, device="cuda")[:64]
    pool = torch.zeros(2, 16, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
    expected = torch.zeros_like(pool)
    write_kv(key, value, pool, slots)
    ref.write_kv(key, value, expected, slots)
    torch.testing.assert_close(pool, expected, rtol=0, atol=0)


def test_write_then_decode_roundtrip(device):
    """The two kernels together, as a decode step uses them: write this step's K/V, attend."""
    query, pool, table, ref_table, lens = _decode_case([4, 11], 4, 4, 2, 64, torch.float32, device)
    # Overwrite each sequence's last token (the "new" one) through the Triton writer.
    pos = lens - 1
    slots = ref_table.gather(1, (pos // 4)[:, None])[:, 0] * 4 + pos % 4
    new_k = torch.randn(2, 2, 64, device=device)
    new_v = torch.randn(2, 2, 64, device=device)
    write_kv(new_k, new_v, pool, slots)
    out = paged_decode_attention(query, pool, table, lens, 0.125)
    expected = _reference(query, pool, ref_table, lens, 0.125, None)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pool[0, slots // 4, slots % 4], new_k, rtol=0, atol=0)


@pytest.mark.parametrize(
    "num_programs, max_positions, splits",
    [
        (8, 131072, 16),  # 1 sequence x 8 KV heads: 264 / 8 = 33, at most 16
        (32, 131072, 8),  # 4 sequences: 264 / 32 -> 9, a power of two below
        (64, 131072, 4),
        (128, 131072, 2),  # 16 sequences: 3 -> 2
        (256, 131072, 2),  # 32 sequences: 264 / 256 -> 2
        (384, 131072, 1),  # 48 sequences fill two programs per SM already
        (8, 1024, 4),  # a table of 1,024 positions: splits of at least 4 tiles of 64
        (8, 512, 2),
    ],
)
def test_decode_splits_fill_two_programs_an_sm(num_programs, max_positions, splits):
    """The split rule the launcher and the simulator share (kernels.decode_splits), on a GPU
    of 132 SMs (the H100 and H200)."""
    from kernels.decode_splits import num_decode_splits

    assert num_decode_splits(132, num_programs, max_positions) == splits
