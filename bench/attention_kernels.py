"""The Triton attention kernels against torch SDPA (prefill) and against bytes moved (decode).

    PYTHONPATH=. python bench/attention_kernels.py [--sweep] [--out FILE]        # CUDA only

1. Prefill: ``paged_prefill_attention`` on a paged pool (tokens_per_block 32, shuffled block
   table, context 0) against ``scaled_dot_product_attention(is_causal=True)`` on the same data
   laid out contiguously as [B, H, T, D] (K/V repeated to H heads, so that torch picks its
   flash/cuDNN kernel). bf16; FLOPs = B * 4 * T * T / 2 * H * D (the QK^T and PV products of a
   causal mask, 2 FLOPs per MAC, half the T x T scores); ratio = kernel ms / SDPA ms.
2. ``--sweep``: (block_m, block_n, num_warps, num_stages) for one prefill shape, best first.
3. Decode: ``paged_decode_attention`` for batches 1, 64, 256 at context 1024; bandwidth = bytes
   of K and V read (B * 1024 * Hkv * D * 2 * 2) / time.
4. ``--decode-sweep``: (block_n, num_warps, num_stages, num_splits) of the decode kernel at
   batch 64 and 256, context 1024, and at batch 64 with ragged lengths (64..1984, mean 1024),
   best first; ``--decode-sweep-out FILE`` writes the best (block_n, num_warps, num_stages) of
   the llama-8b batch-64 case as ``B,W,S`` (for ``SCHEDLAB_DECODE_CONFIG``).
Times are medians of ``triton.testing.do_bench``. Prints markdown tables; --out writes them too.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from kernels import paged_decode_attention, paged_prefill_attention
from kernels.paged_prefill import _default_config

DEVICE, DTYPE = "cuda", torch.bfloat16
# name -> (num_heads, num_kv_heads, head_dim)
MODELS = {"llama-8b": (32, 8, 128), "llama-1b": (32, 8, 64)}
PREFILL_BATCHES = [(1, 2048), (4, 2048), (8, 1024), (16, 512)]  # (sequences, tokens each)
DECODE_BATCHES = [1, 64, 256]
DECODE_CONTEXT = 1024
DECODE_SWEEP = {
    "block_n": [32, 64, 128],
    "num_warps": [4, 8],
    "num_stages": [1, 2, 3],
    "num_splits": [1, 2],
}
TOKENS_PER_BLOCK = 32
SWEEP = {
    "block_m": [64, 128],
    "block_n": [32, 64, 128],
    "num_warps": [4, 8],
    "num_stages": [2, 3, 4],
}


def paged_pool(k, v, gen):
    """K/V of [B, T, Hkv, D] into a [2, blocks, TOKENS_PER_BLOCK, Hkv, D] pool, blocks shuffled."""
    batch, seq_len, num_kv_heads, head_dim = k.shape
    per_seq = -(-seq_len // TOKENS_PER_BLOCK)
    perm = torch.randperm(batch * per_seq, generator=gen, device=gen.device)
    table = perm.view(batch, per_seq)
    pool = k.new_zeros((2, batch * per_seq, TOKENS_PER_BLOCK, num_kv_heads, head_dim))
    pos = torch.arange(seq_len, device=k.device)
    blocks, offsets = table[:, pos // TOKENS_PER_BLOCK], pos % TOKENS_PER_BLOCK
    pool[0, blocks, offsets] = k
    pool[1, blocks, offsets] = v
    return pool, table


def prefill_case(model, batch, seq_len):
    """(kernel args, SDPA q/k/v) holding the same bf16 values."""
    num_heads, num_kv_heads, head_dim = MODELS[model]
    gen, dev, dt = torch.Generator(DEVICE).manual_seed(0), DEVICE, DTYPE
    q = torch.randn((batch, seq_len, num_heads, head_dim), generator=gen, device=dev, dtype=dt)
    kv_shape = (2, batch, seq_len, num_kv_heads, head_dim)
    k, v = torch.randn(kv_shape, generator=gen, device=dev, dtype=dt)
    pool, table = paged_pool(k, v, gen)
    starts = torch.arange(batch + 1, device=dev) * seq_len
    seq_lens = torch.full((batch,), seq_len, device=dev)
    args = (q.view(-1, num_heads, head_dim), pool, starts, seq_lens, table, seq_len)
    group = num_heads // num_kv_heads
    sdpa = [q.transpose(1, 2).contiguous()]
    sdpa += [t.transpose(1, 2).repeat_interleave(group, dim=1).contiguous() for t in (k, v)]
    return args, sdpa


def time_ms(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def table_md(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def bench_prefill():
    rows = []
    for model, (batch, seq_len) in itertools.product(MODELS, PREFILL_BATCHES):
        num_heads, _, head_dim = MODELS[model]
        args, (q, k, v) = prefill_case(model, batch, seq_len)
        scale = head_dim**-0.5
        out = paged_prefill_attention(*args, scale)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = out.view(batch, seq_len, num_heads, head_dim).transpose(1, 2)
        err = (out - ref).abs().max().item()
        ms = time_ms(partial(paged_prefill_attention, *args, scale))
        sdpa_ms = time_ms(partial(F.scaled_dot_product_attention, q, k, v, is_causal=True))
        flops = batch * 4 * seq_len * seq_len / 2 * num_heads * head_dim
        cfg = "/".join(map(str, _default_config(args[0])))
        tflops, sdpa_tflops = flops / ms / 1e9, flops / sdpa_ms / 1e9
        rows.append([model, f"{batch}x{seq_len}", cfg, f"{ms:.3f}", f"{tflops:.0f}"])
        rows[-1] += [f"{sdpa_ms:.3f}", f"{sdpa_tflops:.0f}", f"{ms / sdpa_ms:.2f}", f"{err:.1e}"]
    header = ["model", "B x T", "BM/BN/warps/stages", "ms", "TFLOP/s", "SDPA ms", "SDPA TFLOP/s"]
    header += ["ratio", "max |err|"]
    return f"## Prefill ({DTYPE}, causal)\n\n" + table_md(header, rows)


def bench_sweep(model, batch, seq_len):
    args, _ = prefill_case(model, batch, seq_len)
    num_heads, _, head_dim = MODELS[model]
    scale = head_dim**-0.5
    flops = batch * 4 * seq_len * seq_len / 2 * num_heads * head_dim
    expected = paged_prefill_attention(*args, scale)  # default config
    rows = []
    for cfg in itertools.product(*SWEEP.values()):
        kw = dict(zip(SWEEP, cfg, strict=True))
        try:
            diff = (paged_prefill_attention(*args, scale, **kw) - expected).abs().max().item()
            ms = time_ms(partial(paged_prefill_attention, *args, scale, **kw))
        except Exception as exc:  # e.g. triton OutOfResources: too much shared memory
            print(f"  skip {cfg}: {type(exc).__name__}", file=sys.stderr)
            continue
        rows.append([*cfg, ms, flops / ms / 1e9, diff])
    if not rows:
        return "## Sweep\n\nno config ran"
    rows.sort(key=lambda r: r[4])
    best = "/".join(map(str, rows[0][:4]))
    default = "/".join(map(str, _default_config(args[0])))
    title = f"## Sweep: {model} {batch}x{seq_len} (best {best}; default {default})\n\n"
    shown = [[*r[:4], f"{r[4]:.3f}", f"{r[5]:.0f}", f"{r[6]:.1e}"] for r in rows]
    return title + table_md([*SWEEP, "ms", "TFLOP/s", "max |diff| vs default"], shown)


def decode_case(model, batch, ragged=False):
    """(query, pool, block table, seq_lens, scale, K/V bytes read) of a decode batch at
    ``DECODE_CONTEXT``; ``ragged``: lengths spread evenly over 64 .. 2 * context - 64."""
    num_heads, num_kv_heads, head_dim = MODELS[model]
    gen, dev, dt = torch.Generator(DEVICE).manual_seed(1), DEVICE, DTYPE
    longest = 2 * DECODE_CONTEXT if ragged else DECODE_CONTEXT
    shape = (2, batch, longest, num_kv_heads, head_dim)
    k, v = torch.randn(shape, generator=gen, device=dev, dtype=dt)
    pool, table = paged_pool(k, v, gen)
    del k, v
    query = torch.randn((batch, num_heads, head_dim), generator=gen, device=dev, dtype=dt)
    if ragged:
        lengths = torch.linspace(64, longest - 64, batch, device=dev).round().long()
        seq_lens = lengths[torch.randperm(batch, generator=gen, device=dev)]
    else:
        seq_lens = torch.full((batch,), DECODE_CONTEXT, device=dev)
    kv_bytes = int(seq_lens.sum()) * num_kv_heads * head_dim * 2 * 2
    return query, pool, table, seq_lens, head_dim**-0.5, kv_bytes


def bench_decode_sweep(out: Path | None = None):
    sections, best_8b = [], None
    cases = [(64, False), (256, False), (64, True)]
    for model, (batch, ragged) in itertools.product(MODELS, cases):
        query, pool, table, seq_lens, scale, kv_bytes = decode_case(model, batch, ragged)
        expected = paged_decode_attention(query, pool, table, seq_lens, scale)  # defaults
        default_us = time_ms(partial(paged_decode_attention, query, pool, table, seq_lens, scale))
        rows = []
        for cfg in itertools.product(*DECODE_SWEEP.values()):
            kw = dict(zip(DECODE_SWEEP, cfg, strict=True))
            call = partial(paged_decode_attention, query, pool, table, seq_lens, scale, **kw)
            try:
                diff = (call() - expected).abs().max().item()
                ms = time_ms(call)
            except Exception as exc:  # e.g. triton OutOfResources: too much shared memory
                print(f"  skip {cfg}: {type(exc).__name__}", file=sys.stderr)
                continue
            rows.append([*cfg, ms, kv_bytes / ms / 1e6, diff])
        rows.sort(key=lambda r: r[4])
        if model == "llama-8b" and batch == 64 and not ragged and rows:
            best_8b = rows[0][:3]
        shape = f"{model} batch {batch}" + (" ragged" if ragged else "")
        title = f"## Decode sweep: {shape} (default {default_us * 1e3:.1f} us)\n\n"
        shown = [[*r[:4], f"{r[4] * 1e3:.1f}", f"{r[5]:.0f}", f"{r[6]:.1e}"] for r in rows[:8]]
        header = [*DECODE_SWEEP, "us", "GB/s", "max |diff| vs default"]
        sections.append(title + table_md(header, shown))
    if out is not None and best_8b is not None:
        out.write_text(",".join(map(str, best_8b)) + "\n")
    return "\n\n".join(sections)


def bench_decode():
    rows = []
    for model, batch in itertools.product(MODELS, DECODE_BATCHES):
        query, pool, table, seq_lens, scale, kv_bytes = decode_case(model, batch)
        ms = time_ms(partial(paged_decode_attention, query, pool, table, seq_lens, scale))
        rows.append([model, batch, f"{ms * 1e3:.1f}", f"{kv_bytes / 1e6:.1f}"])
        rows[-1].append(f"{kv_bytes / ms / 1e6:.0f}")
    header = ["model", "batch", "us", "K/V MB", "GB/s"]
    return f"## Decode ({DTYPE}, context {DECODE_CONTEXT})\n\n" + table_md(header, rows)


def seqs_x_tokens(text: str) -> tuple[int, int]:
    try:
        batch, seq_len = (int(x) for x in text.lower().split("x"))
    except ValueError:
        msg = f"expected SEQSxTOKENS such as 4x2048, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    return batch, seq_len


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="sweep prefill tile configs")
    parser.add_argument("--sweep-model", choices=list(MODELS), default="llama-8b")
    parser.add_argument("--sweep-batch", type=seqs_x_tokens, default="4x2048", help="SEQSxTOKENS")
    parser.add_argument("--decode-sweep", action="store_true", help="sweep decode configs")
    parser.add_argument("--decode-sweep-out", type=Path, help="write the best 8b config here")
    parser.add_argument("--no-prefill", action="store_true", help="skip the prefill table")
    parser.add_argument("--out", type=Path, help="also write the tables here (markdown)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "attention_kernels: needs a CUDA GPU and none is visible; nothing run.", file=sys.stderr
        )
        return 1
    name = torch.cuda.get_device_name()
    sections = [
        f"# Attention kernels on {name} (torch {torch.__version__}, triton {triton.__version__})"
    ]
    if not args.no_prefill:
        sections.append(bench_prefill())
    if args.decode_sweep:
        sections.append(bench_decode_sweep(args.decode_sweep_out))
    if args.sweep:
        sections.append(bench_sweep(args.sweep_model, *args.sweep_batch))
    sections.append(bench_decode())
    text = "\n\n".join(sections) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
