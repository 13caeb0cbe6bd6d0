"""Fused Triton kernels (RMSNorm, RoPE, SiLU-and-mul) against the HF-style torch expressions.

Without CUDA the kernels run through Triton's interpreter on CPU tensors in float32 and
float64 (tight tolerances); on a CUDA machine the same tests run the compiled kernels, plus
bf16/fp16 cases. (The interpreter rounds fp32 -> bf16 by truncation, not to nearest, so half
precision is only checked compiled.)
"""

import os

import torch

# Must be set before triton.jit decorates the kernels, i.e. before kernels is imported.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch.nn.functional as F

from kernels import apply_rotary, rms_norm, silu_and_mul

CUDA = torch.cuda.is_available()
HALF_DTYPES = [torch.bfloat16, torch.float16]
# Tight tolerances (rtol, atol) per dtype for the fp32/fp64 comparisons.
TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12)}


@pytest.fixture
def device() -> str:
    return "cuda" if CUDA else "cpu"


def _randn(*shape, dtype, device, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)


def _strided(t: torch.Tensor, pad: int = 7) -> torch.Tensor:
    """The same values as a column slice of a wider buffer: row stride != width, offset > 0."""
    wide = torch.full(
        (t.shape[0], t.shape[1] + 2 * pad), float("nan"), dtype=t.dtype, device=t.device
    )
    wide[:, pad : pad + t.shape[1]] = t
    view = wide[:, pad : pad + t.shape[1]]
    assert not view.is_contiguous() or t.shape[0] <= 1
    return view


# ---- torch references (HF's expressions) ------------------------------------------------------


def rms_norm_ref(x, weight, eps, compute_dtype=torch.float32):
    """HF ``LlamaRMSNorm.forward``; ``compute_dtype`` is float64 for float64 inputs (HF: fp32)."""
    input_dtype = x.dtype
    hidden = x.to(compute_dtype)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rope_ref(x, cos, sin):
    """HF ``apply_rotary_pos_emb`` on [tokens, heads, head_dim] with [tokens, head_dim] cos/sin."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def silu_and_mul_ref(gate_up):
    """HF ``LlamaMLP``'s ``act_fn(gate_proj(x)) * up_proj(x)`` on a fused gate/up output."""
    intermediate = gate_up.shape[-1] // 2
    return F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]


def _hf_cos_sin(positions, head_dim, dtype, base=10000.0):
    """cos/sin as HF's default rotary module builds them: cat(freqs, freqs) at each position."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# ---- rms_norm ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize(
    "num_rows,hidden", [(1, 64), (5, 96), (33, 128), (3, 4096), (2, 8192), (4, 1), (6, 300)]
)
def test_rms_norm_matches_reference(device, dtype, strided, num_rows, hidden):
    x = _randn(num_rows, hidden, dtype=dtype, device=device, seed=hidden, scale=3.0)
    weight = _randn(hidden, dtype=dtype, device=device, seed=1)
    if strided:
        x = _strided(x)
    out = rms_norm(x, weight, 1e-6)
    expected = rms_norm_ref(x, weight, 1e-6, compute_dtype=dtype)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_rows,hidden", [(3, 64), (17, 96), (2, 4096)])
def test_rms_norm_residual_returns_exact_sum(device, dtype, num_rows, hidden):
    x = _strided(_randn(num_rows, hidden, dtype=dtype, device=device, seed=2))
    residual = _strided(_randn(num_rows, hidden, dtype=dtype, device=device, seed=3), pad=3)
    weight = _randn(hidden, dtype=dtype, device=device, seed=4)
    out, total = rms_norm(x, weight, 1e-5, residual=residual)
    # The decoder layer's `residual + hidden`, bit for bit.
    assert total.dtype == dtype and total.is_contiguous()
    assert torch.equal(total, residual + x)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(
        out, rms_norm_ref(residual + x, weight, 1e-5, dtype), rtol=rtol, atol=atol
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 64), (3, 1, 96)])
def test_rms_norm_per_head_views(device, dtype, num_heads, num_kv_heads, head_dim):
    """Qwen3's q/k norm straight on head views of a fused qkv output (no copy)."""
    num_tokens = 5
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = _randn(num_tokens, width, dtype=dtype, device=device, seed=5)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(
        num_tokens, num_kv_heads, head_dim
    )
    weight = _randn(head_dim, dtype=dtype, device=device, seed=6)
    rtol, atol = TOL[dtype]
    for heads in (q, k):
        out = rms_norm(heads, weight, 1e-6)
        assert out.shape == heads.shape and out.is_contiguous()
        torch.testing.assert_close(
            out, rms_norm_ref(heads, weight, 1e-6, dtype), rtol=rtol, atol=atol
        )


@pytest.mark.parametrize(
    "x_dtype,w_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)]
)
def test_rms_norm_output_dtype_follows_promotion(device, x_dtype, w_dtype):
    x = _randn(4, 96, dtype=x_dtype, device=device, seed=7)
    weight = _randn(96, dtype=w_dtype, device=device, seed=8)
    out = rms_norm(x, weight, 1e-6)
    expected = rms_norm_ref(x, weight, 1e-6, compute_dtype=x_dtype)
    assert out.dtype == expected.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_rms_norm_matches_transformers_module(device):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    module = LlamaRMSNorm(160, eps=1e-5).to(device)
    with torch.no_grad():
        module.weight.copy_(_randn(160, dtype=torch.float32, device=device, seed=9))
    x = _randn(6, 160, dtype=torch.float32, device=device, seed=10, scale=5.0)
    with torch.no_grad():
        expected = module(x)
    torch.testing.assert_close(rms_norm(x, module.weight.detach(), 1e-5), expected)


def test_rms_norm_zero_rows(device):
    weight = torch.ones(64, device=device)
    out = rms_norm(torch.empty(0, 64, device=device), weight, 1e-6)
    assert out.shape == (0, 64)
    out, total = rms_norm(
        torch.empty(0, 64, device=device), weight, 1e-6, residual=torch.empty(0, 64, device=device)
    )
    assert out.shape == total.shape == (0, 64)
    assert rms_norm(torch.empty(0, 4, 64, device=device), weight, 1e-6).shape == (0, 4, 64)


@pytest.mark.parametrize(
    "x_shape,w_shape,r_shape",
    [
        ((4, 64), (32,), None),  # weight size
        ((64,), (64,), None),  # 1-d x
        ((2, 3, 4, 64), (64,), None),  # 4-d x
        ((4, 64), (64,), (4, 32)),  # residual shape
        ((4, 0), (0,), None),  # empty hidden
    ],
)
def test_rms_norm_rejects_bad_shapes(x_shape, w_shape, r_shape):
    x = torch.zeros(x_shape)
    residual = None if r_shape is None else torch.zeros(r_shape)
    with pytest.raises(ValueError):
        rms_norm(x, torch.ones(w_shape), 1e-6, residual=residual)


def test_rms_norm_rejects_residual_dtype():
    with pytest.raises(ValueError, match="residual"):
        rms_norm(torch.zeros(2, 8), torch.ones(8), 1e-6, residual=torch.zeros(2, 8).double())


# ---- apply_rotary -----------------------------------------------------------------------------


def _qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, seed=0):
    """q, k as head views of a fused qkv projection output (token stride != heads * head_dim)."""
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = _randn(num_tokens, width, dtype=dtype, device=device, seed=seed, scale=2.0)
    q_end = num_heads * head_dim
    k_end = q_end + num_kv_heads * head_dim
    q = qkv[:, :q_end].view(num_tokens, num_heads, head_dim)
    k = qkv[:, q_end:k_end].view(num_tokens, num_kv_heads, head_dim)
    return qkv, q, k


# (num_tokens, num_heads, num_kv_heads, head_dim)
ROPE_SHAPES = [
    pytest.param(1, 4, 2, 64, id="t1-gqa2-d64"),
    pytest.param(5, 8, 2, 128, id="t5-gqa4-d128"),
    pytest.param(3, 3, 1, 96, id="t3-d96"),
    pytest.param(2, 20, 4, 128, id="t2-partial-head-block"),
    pytest.param(4, 2, 2, 6, id="t4-d6"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_tokens,num_heads,num_kv_heads,head_dim", ROPE_SHAPES)
def test_rotary_matches_reference(device, dtype, num_tokens, num_heads, num_kv_heads, head_dim):
    qkv, q, k = _qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device)
    positions = torch.randint(0, 4096, (num_tokens,), generator=torch.Generator().manual_seed(1))
    cos, sin = _hf_cos_sin(positions, head_dim, dtype)
    cos, sin = cos.to(device), sin.to(device)
    expected_q, expected_k = rope_ref(q, cos, sin), rope_ref(k, cos, sin)
    before = qkv.clone()

    assert apply_rotary(q, k, cos, sin) is None
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(q, expected_q, rtol=rtol, atol=atol)
    torch.testing.assert_close(k, expected_k, rtol=rtol, atol=atol)
    # The v part of the buffer is untouched.
    v_start = (num_heads + num_kv_heads) * head_dim
    assert torch.equal(qkv[:, v_start:], before[:, v_start:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotary_general_cos_sin_strided(device, dtype):
    """cos/sin need not be cat(f, f) and may be strided views; separate q and k buffers."""
    num_tokens, head_dim = 6, 64
    q = _randn(num_tokens, 3, 2 * head_dim, dtype=dtype, device=device, seed=2)[:, :, ::2]
    k = _randn(2, num_tokens, head_dim, dtype=dtype, device=device, seed=3).transpose(0, 1)
    cos = _strided(_randn(num_tokens, head_dim, dtype=dtype, device=device, seed=4))
    sin = _strided(_randn(num_tokens, head_dim, dtype=dtype, device=device, seed=5))
    expected_q, expected_k = rope_ref(q, cos, sin), rope_ref(k, cos, sin)
    apply_rotary(q, k, cos, sin)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(q, expected_q, rtol=rtol, atol=atol)
    torch.testing.assert_close(k, expected_k, rtol=rtol, atol=atol)


def test_rotary_float32_cos_sin_on_float64_q(device):
    _, q, k = _qkv_views(3, 2, 1, 32, torch.float64, device, seed=6)
    cos, sin = _hf_cos_sin(torch.tensor([0, 7, 1000]), 32, torch.float32)
    cos, sin = cos.to(device), sin.to(device)
    expected_q, expected_k = rope_ref(q, cos, sin), rope_ref(k, cos, sin)
    apply_rotary(q, k, cos, sin)
    torch.testing.assert_close(q, expected_q, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k, expected_k, rtol=1e-12, atol=1e-12)


def test_rotary_zero_tokens(device):
    _, q, k = _qkv_views(0, 4, 2, 64, torch.float32, device)
    cos = torch.empty(0, 64, device=device)
    apply_rotary(q, k, cos, cos)


@pytest.mark.parametrize(
    "q_shape,k_shape,cos_shape,k_dtype",
    [
        ((2, 4, 63), (2, 2, 63), (2, 63), torch.float32),  # odd head_dim
        ((2, 4, 64), (3, 2, 64), (2, 64), torch.float32),  # token counts differ
        ((2, 4, 64), (2, 2, 32), (2, 64), torch.float32),  # head_dims differ
        ((2, 4, 64), (2, 2, 64), (2, 32), torch.float32),  # cos width
        ((2, 4, 64), (2, 2, 64), (2, 64), torch.float64),  # q/k dtypes differ
        ((2, 256), (2, 2, 64), (2, 64), torch.float32),  # q not 3-d
    ],
)
def test_rotary_rejects_bad_shapes(q_shape, k_shape, cos_shape, k_dtype):
    cos = torch.zeros(cos_shape)
    with pytest.raises(ValueError):
        apply_rotary(torch.zeros(q_shape), torch.zeros(k_shape, dtype=k_dtype), cos, cos)


# ---- silu_and_mul -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contig", "strided", "col-stride-2"])
@pytest.mark.parametrize("num_tokens,intermediate", [(1, 37), (3, 100), (2, 1024), (2, 1500)])
def test_silu_and_mul_matches_reference(device, dtype, layout, num_tokens, intermediate):
    gate_up = _randn(num_tokens, 2 * intermediate, dtype=dtype, device=device, seed=8, scale=4.0)
    if layout == "strided":
        gate_up = _strided(gate_up)
    elif layout == "col-stride-2":
        wide = torch.zeros(num_tokens, 4 * intermediate, dtype=dtype, device=device)
        wide[:, ::2] = gate_up
        gate_up = wide[:, ::2]
    out = silu_and_mul(gate_up)
    assert out.shape == (num_tokens, intermediate) and out.dtype == dtype and out.is_contiguous()
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out, silu_and_mul_ref(gate_up), rtol=rtol, atol=atol)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy
def test_silu_and_mul_saturates_without_nan(device):
    gate = torch.tensor([[-1000.0, -100.0, -20.0, 0.0, 20.0, 100.0, 1000.0]], device=device)
    gate_up = torch.cat([gate, torch.full_like(gate, 3.0)], dim=1)
    out = silu_and_mul(gate_up)
    assert not out.isnan().any()
    torch.testing.assert_close(out, silu_and_mul_ref(gate_up), rtol=1e-5, atol=1e-5)


def test_silu_and_mul_zero_tokens_and_bad_shapes(device):
    assert silu_and_mul(torch.empty(0, 200, device=device)).shape == (0, 100)
    with pytest.raises(ValueError):
        silu_and_mul(torch.zeros(2, 7))
    with pytest.raises(ValueError):
        silu_and_mul(torch.zeros(2, 3, 8))


# ---- half precision, compiled -----------------------------------------------------------------


@pytest.mark.skipif(not CUDA, reason="half precision runs on CUDA only (not in the interpreter)")
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("fp32_weight", [False, True], ids=["w-model-dtype", "w-fp32"])
@pytest.mark.parametrize("num_rows,hidden", [(1, 4096), (64, 4096), (7, 96), (300, 128)])
def test_rms_norm_half_precision_cuda(dtype, fp32_weight, num_rows, hidden):
    x = _strided(_randn(num_rows, hidden, dtype=dtype, device="cuda", seed=11, scale=3.0))
    residual = _randn(num_rows, hidden, dtype=dtype, device="cuda", seed=12, scale=3.0)
    w_dtype = torch.float32 if fp32_weight else dtype
    weight = _randn(hidden, dtype=w_dtype, device="cuda", seed=13)

    out = rms_norm(x, weight, 1e-6)
    expected = rms_norm_ref(x, weight, 1e-6)
    assert out.dtype == expected.dtype
    # Both round the fp32-normalised row to `dtype`; their fp32 rows differ in the last bits,
    # so an element may land one half-precision ulp apart.
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)

    out, total = rms_norm(x, weight, 1e-6, residual=residual)
    assert torch.equal(total, residual + x)
    torch.testing.assert_close(out, rms_norm_ref(total, weight, 1e-6), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not CUDA, reason="half precision runs on CUDA only (not in the interpreter)")
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("cos_dtype", ["model", "fp32"])
@pytest.mark.parametrize(
    "num_tokens,num_heads,num_kv_heads,head_dim",
    [(1, 32, 8, 128), (77, 32, 8, 128), (9, 12, 2, 64)],
)
def test_rotary_half_precision_cuda(
    dtype, cos_dtype, num_tokens, num_heads, num_kv_heads, head_dim
):
    _, q, k = _qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, "cuda", seed=14)
    positions = torch.randint(0, 8192, (num_tokens,), generator=torch.Generator().manual_seed(2))
    cos, sin = _hf_cos_sin(positions, head_dim, dtype if cos_dtype == "model" else torch.float32)
    cos, sin = cos.cuda(), sin.cuda()
    hf_q, hf_k = rope_ref(q, cos, sin), rope_ref(k, cos, sin)  # rounds in the model dtype
    cos32, sin32 = cos.float(), sin.float()
    f32_q, f32_k = rope_ref(q.float(), cos32, sin32), rope_ref(k.float(), cos32, sin32)
    apply_rotary(q, k, cos, sin)
    assert q.dtype == dtype
    for out, f32, hf in ((q, f32_q, hf_q), (k, f32_k, hf_k)):
        # One rounding of the fp32 result...
        torch.testing.assert_close(out.float(), f32.float(), rtol=2**-7, atol=1e-5)
        # ...and within a few roundings of HF's expression (three roundings in the model dtype).
        torch.testing.assert_close(out, hf.to(dtype), rtol=2e-2, atol=6e-2)


@pytest.mark.skipif(not CUDA, reason="half precision runs on CUDA only (not in the interpreter)")
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("num_tokens,intermediate", [(1, 14336), (64, 8192), (5, 37)])
def test_silu_and_mul_half_precision_cuda(dtype, num_tokens, intermediate):
    gate_up = _randn(num_tokens, 2 * intermediate, dtype=dtype, device="cuda", seed=15, scale=3.0)
    out = silu_and_mul(gate_up)
    assert out.dtype == dtype
    torch.testing.assert_close(
        out.float(), silu_and_mul_ref(gate_up.float()), rtol=2**-7, atol=1e-5
    )
    torch.testing.assert_close(out, silu_and_mul_ref(gate_up), rtol=2e-2, atol=2e-2)
