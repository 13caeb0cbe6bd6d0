"""The paged forward against HF transformers (float64, CPU), presets and loading."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel

from engine.model_engine import ForwardBatch
from engine.models import PRESETS, ByteTokenizer, PagedCausalLM, load_model

TINY_PRESETS = [name for name in PRESETS if name.endswith("-tiny")]
DTYPE = torch.float64


@dataclass
class Chunk:
    """The new tokens ``tokens[start:end]`` of one sequence in one step."""

    tokens: list[int]  # the sequence's tokens (at least up to ``end``)
    start: int
    end: int
    blocks: list[int]  # its block table


def make_batch(chunks: list[Chunk], tokens_per_block: int, all_logits: bool) -> ForwardBatch:
    """Flatten ``chunks`` like the engine does; logits at every token or at each chunk's last."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start_loc = [0]
    logits_indices: list[int] = []
    for chunk in chunks:
        first = len(input_ids)
        for pos in range(chunk.start, chunk.end):
            input_ids.append(chunk.tokens[pos])
            positions.append(pos)
            block = chunk.blocks[pos // tokens_per_block]
            slots.append(block * tokens_per_block + pos % tokens_per_block)
        query_start_loc.append(len(input_ids))
        logits_indices.extend(range(first, len(input_ids)) if all_logits else [len(input_ids) - 1])
    width = max(len(chunk.blocks) for chunk in chunks)
    table = [chunk.blocks + [0] * (width - len(chunk.blocks)) for chunk in chunks]

    def tensor(values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64)

    return ForwardBatch(
        input_ids=tensor(input_ids),
        positions=tensor(positions),
        slot_mapping=tensor(slots),
        query_start_loc=tensor(query_start_loc),
        seq_lens=tensor([chunk.end for chunk in chunks]),
        block_tables=tensor(table),
        logits_indices=tensor(logits_indices),
        max_query_len=max(chunk.end - chunk.start for chunk in chunks),
        max_seq_len=max(chunk.end for chunk in chunks),
    )


def nan_pool(model: PagedCausalLM, num_blocks: int, tokens_per_block: int) -> torch.Tensor:
    """A pool full of NaN: any read of an unwritten or foreign slot that leaks shows up."""
    shape = (model.num_layers, 2, num_blocks, tokens_per_block, model.num_kv_heads, model.head_dim)
    return torch.full(shape, float("nan"), dtype=model.dtype)


def allocate_blocks(
    lengths: list[int], tokens_per_block: int, rng: random.Random
) -> list[list[int]]:
    """Shuffled, non-contiguous block ids (block 0, the table padding value, included)."""
    needed = [math.ceil(n / tokens_per_block) for n in lengths]
    pool = list(range(sum(needed) + 3))
    rng.shuffle(pool)
    tables, used = [], 0
    for n in needed:
        tables.append(pool[used : used + n])
        used += n
    return tables


def check_mixed_batch(hf_model: PreTrainedModel, tokens_per_block: int) -> None:
    """Three steps: A prefilled in two chunks then decoded, B prefilled whole, C decoded twice.

    Every new token's logits must equal the HF full-sequence forward's at its position.
    """
    rng = random.Random(tokens_per_block)
    vocab = hf_model.config.vocab_size
    seq_a, seq_b, seq_c = ([rng.randrange(3, vocab) for _ in range(n)] for n in (38, 23, 11))
    blocks_a, blocks_b, blocks_c = allocate_blocks([38, 23, 11], tokens_per_block, rng)
    steps = [
        [Chunk(seq_a, 0, 20, blocks_a), Chunk(seq_c, 0, 9, blocks_c)],
        [
            Chunk(seq_a, 20, 37, blocks_a),
            Chunk(seq_b, 0, 23, blocks_b),
            Chunk(seq_c, 9, 10, blocks_c),
        ],
        [Chunk(seq_a, 37, 38, blocks_a), Chunk(seq_c, 10, 11, blocks_c)],
    ]
    with torch.no_grad():
        reference = {id(s): hf_model(torch.tensor([s])).logits[0] for s in (seq_a, seq_b, seq_c)}

    model = PagedCausalLM(hf_model)
    num_blocks = 1 + max(max(blocks) for blocks in (blocks_a, blocks_b, blocks_c))
    kv_pool = nan_pool(model, num_blocks, tokens_per_block)
    for chunks in steps:
        logits = model.forward(make_batch(chunks, tokens_per_block, all_logits=True), kv_pool)
        assert logits.dtype == DTYPE
        expected = torch.cat([reference[id(c.tokens)][c.start : c.end] for c in chunks])
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-9)


def paged_greedy(
    model: PagedCausalLM, prompts: list[list[int]], max_new_tokens: int, tokens_per_block: int
) -> list[list[int]]:
    """Greedy decoding of all prompts together: one batched prefill, then batched decodes."""
    total = [len(p) + max_new_tokens for p in prompts]
    tables = allocate_blocks(total, tokens_per_block, random.Random(0))
    kv_pool = nan_pool(model, 1 + max(max(t) for t in tables), tokens_per_block)
    seqs = [list(p) for p in prompts]
    starts = [0] * len(seqs)
    for _ in range(max_new_tokens):
        chunks = [
            Chunk(s, start, len(s), t) for s, start, t in zip(seqs, starts, tables, strict=True)
        ]
        logits = model.forward(make_batch(chunks, tokens_per_block, all_logits=False), kv_pool)
        starts = [len(s) for s in seqs]
        for seq, token in zip(seqs, logits.argmax(dim=-1).tolist(), strict=True):
            seq.append(token)
    return [s[len(p) :] for s, p in zip(seqs, prompts, strict=True)]


def tiny(name: str, seed: int = 0) -> PreTrainedModel:
    return load_model(name, device="cpu", dtype=DTYPE, seed=seed).hf_model


@pytest.mark.parametrize("tokens_per_block", [4, 16])
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_paged_forward_matches_hf_logits(preset: str, tokens_per_block: int) -> None:
    check_mixed_batch(tiny(preset), tokens_per_block)


def test_sliding_window_matches_hf() -> None:
    preset = PRESETS["mistral-tiny"]
    config = preset.make_config()
    config.sliding_window = 6  # shorter than every chunk and sequence of the mixed batch
    torch.manual_seed(0)
    hf_model = preset.model_class(config).to(DTYPE).eval()
    check_mixed_batch(hf_model, tokens_per_block=4)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_greedy_matches_hf_generate(preset: str) -> None:
    """Token-for-token equality with generate(), on outputs that are not degenerate."""
    hf_model = tiny(preset)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 259) for _ in range(n)] for n in (7, 12)]
    new_tokens = 10
    ours = paged_greedy(PagedCausalLM(hf_model), prompts, new_tokens, tokens_per_block=4)
    for prompt, generated in zip(prompts, ours, strict=True):
        # eos_token_id=None turns off EOS stopping, so every output has new_tokens tokens.
        out = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None
        )
        expected = out[0, len(prompt) :].tolist()
        assert len(expected) == new_tokens
        assert generated == expected
        # A degenerate random model (one repeated token) would make the equality meaningless.
        assert len(set(generated)) >= 3, f"{preset} is degenerate: {generated}"


def test_seed_determines_weights() -> None:
    a, b, c = tiny("qwen2-tiny", seed=0), tiny("qwen2-tiny", seed=0), tiny("qwen2-tiny", seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters(), strict=True))


def test_tiny_presets_randomise_biases_and_norms() -> None:
    attn = tiny("qwen2-tiny").model.layers[0].self_attn
    assert attn.q_proj.bias.abs().min() > 0
    qwen3 = tiny("qwen3-tiny")
    for norm in (qwen3.model.norm, qwen3.model.layers[0].self_attn.q_norm):
        assert not torch.equal(norm.weight, torch.ones_like(norm.weight))


def test_loading_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny("llama-tiny")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(("preset", "billions"), [("llama-1b", 1.24), ("llama-8b", 8.03)])
def test_big_presets_on_meta(preset: str, billions: float) -> None:
    loaded = load_model(preset, device="meta", dtype=torch.bfloat16)
    params = list(loaded.hf_model.parameters())
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in params)
    assert sum(p.numel() for p in params) / 1e9 == pytest.approx(billions, abs=0.01)
    model = PagedCausalLM(loaded.hf_model)
    assert (model.num_layers, model.num_kv_heads, model.head_dim) == (
        (16, 8, 64) if preset == "llama-1b" else (32, 8, 128)
    )
    assert model.vocab_size == 128256
    assert model.max_seq_len == loaded.max_seq_len == (131072 if preset == "llama-1b" else 8192)


def test_unsupported_architecture() -> None:
    config = GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM"):
        PagedCausalLM(GPT2LMHeadModel(config))


def test_unknown_model_names_the_presets() -> None:
    with pytest.raises(ValueError, match="llama-tiny"):
        load_model("llama-70b", device="cpu", dtype=DTYPE)


def test_checkpoint_directory_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(tmp_path, device="cpu", dtype=DTYPE)
    tiny("llama-tiny").save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_model(tmp_path, device="cpu", dtype=DTYPE)


def test_model_instance_and_metadata() -> None:
    loaded = load_model(tiny("qwen3-tiny"), device="cpu", dtype=torch.float32)
    model = PagedCausalLM(loaded.hf_model)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert (model.num_layers, model.num_kv_heads, model.head_dim) == (2, 2, 32)
    assert loaded.max_seq_len == model.max_seq_len == 512


def test_byte_tokenizer() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert all(3 <= i < tok.vocab_size for i in ids) and tok.vocab_size == 259
    assert tok.decode([tok.bos_token_id, *ids, tok.eos_token_id, tok.pad_token_id]) == "héllo"
    assert tok.decode([3 + 0xFF]) == "\ufffd"


def test_fused_projections_are_views_of_the_hf_weights() -> None:
    """q/k/v and gate/up are fused into one matrix each; the HF parameters become views of it
    (no copy), the HF model's own output is unchanged, and a second engine reuses the fusion."""
    hf = load_model("qwen2-tiny", device="cpu", dtype=torch.float64, seed=0).hf_model
    ids = torch.tensor([[5, 9, 200, 31, 7]])
    before = hf(ids).logits
    attn, mlp = hf.model.layers[0].self_attn, hf.model.layers[0].mlp
    q_before = attn.q_proj.weight.clone()
    first = PagedCausalLM(hf)
    weight, bias = first._qkv[0]
    rows = attn.q_proj.weight.shape[0] + 2 * attn.k_proj.weight.shape[0]
    assert weight.shape == (rows, hf.config.hidden_size) and bias is not None
    assert attn.q_proj.weight.data_ptr() == weight.data_ptr()
    assert attn.v_proj.bias.data_ptr() == bias[rows - attn.v_proj.bias.shape[0] :].data_ptr()
    assert torch.equal(attn.q_proj.weight, q_before)
    gate_up, no_bias = first._gate_up[0]
    assert (
        no_bias is None
        and mlp.up_proj.weight.data_ptr() == gate_up[mlp.gate_proj.out_features].data_ptr()
    )
    torch.testing.assert_close(hf(ids).logits, before, rtol=0, atol=0)
    second = PagedCausalLM(hf)
    assert second._qkv[0][0] is weight and second._gate_up[0][0] is gate_up


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_profile_run_takes_the_largest_step_without_a_pool(backend: str) -> None:
    """The pre-sizing profile runs ``num_tokens`` context tokens over ``num_seqs`` sequences on
    a one-block dummy pool (reads stay inside it, nothing is written)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = load_model("llama-tiny", device=device, dtype=torch.float32, seed=0).hf_model
    model = PagedCausalLM(hf, attention_backend=backend)
    seen = []
    forward = model.forward

    def spy(batch, pool):
        logits = forward(batch, pool)
        seen.append((batch, pool.shape[2], logits.shape[0], bool(logits.isfinite().all())))
        return logits

    model.forward = spy
    peaks = [
        model.profile_run(num_tokens=37, num_seqs=5, tokens_per_block=4),
        model.profile_run(num_tokens=3, num_seqs=8, tokens_per_block=16),
    ]
    assert peaks == [0, 0] if device == "cpu" else all(p > 0 for p in peaks)
    (big, big_blocks, big_rows, big_ok), (small, small_blocks, small_rows, small_ok) = seen
    assert big.num_tokens == 37 and big.seq_lens.tolist() == [8, 8, 7, 7, 7]
    assert big_rows == 5 and big_blocks == 1 and big_ok
    assert bool((big.slot_mapping == -1).all())
    assert small.num_tokens == 3 and small_rows == 3 and small_blocks == 1 and small_ok
