"""``kernels.decode_inputs`` (a CUDA-graph decode step's inputs derived on the device) against
its torch reference, and the reference against the host's own formulas.

Without CUDA the kernel runs through Triton's interpreter on CPU tensors.
"""

import os

import torch

# Must be set before triton.jit decorates the kernels, i.e. before kernels is imported.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

from kernels import decode_inputs
from kernels.decode_inputs import decode_inputs_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_step(num_rows: int, num_real: int, tpb: int, width: int, num_pending: int, seed: int):
    """(sent, pending, block_tables, expected out) of a bucket of ``num_rows`` with
    ``num_real`` real rows, about half of them pending tokens."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, 1000, (num_rows + 3, width), generator=g)  # rows past the bucket
    positions = torch.randint(0, tpb * width, (num_real,), generator=g)
    tokens = torch.randint(0, 50_000, (num_real,), generator=g)
    pending = torch.randint(0, 50_000, (num_pending,), generator=g)
    pending_rows = torch.randint(0, num_pending, (num_real,), generator=g)
    is_pending = torch.rand(num_real, generator=g) < 0.5
    ids = torch.where(is_pending, -1 - pending_rows, tokens)
    pad = num_rows - num_real
    sent = torch.stack(
        [torch.cat([ids, torch.zeros(pad, dtype=torch.long)]),
         torch.cat([positions, torch.full((pad,), -1)])]
    )  # fmt: skip
    # The host's formulas, row by row.
    expected = torch.zeros((4, num_rows), dtype=torch.long)
    for row in range(num_rows):
        if row < num_real:
            p = int(positions[row])
            token = int(pending[pending_rows[row]]) if is_pending[row] else int(tokens[row])
            slot = int(table[row, p // tpb]) * tpb + p % tpb
            expected[:, row] = torch.tensor([token, p, slot, p + 1])
        else:
            expected[:, row] = torch.tensor([0, 0, -1, 1])
    return sent, pending, table, expected


@pytest.mark.parametrize(
    "derive", [decode_inputs, decode_inputs_reference], ids=["triton", "torch"]
)
@pytest.mark.parametrize(
    "num_rows,num_real,tpb,width,num_pending",
    [(1, 1, 16, 4, 1), (8, 5, 4, 9, 8), (48, 48, 32, 33, 256), (256, 200, 16, 70, 300),
     (130, 3, 1, 5, 2)],
)  # fmt: skip
def test_decode_inputs_match_the_host_formulas(derive, num_rows, num_real, tpb, width, num_pending):
    sent, pending, table, expected = random_step(num_rows, num_real, tpb, width, num_pending, 3)
    # Views of wider buffers, as in the runner: a bucket's columns of [2, B] and [4, B].
    wide_sent = torch.full((2, num_rows + 5), 99, dtype=torch.long)
    wide_sent[:, :num_rows] = sent
    wide_out = torch.full((4, num_rows + 5), 77, dtype=torch.long, device=DEVICE)
    out = wide_out[:, :num_rows]
    derive(wide_sent[:, :num_rows].to(DEVICE), pending.to(DEVICE), table.to(DEVICE), tpb, out)
    assert out.cpu().tolist() == expected.tolist()
    assert bool((wide_out[:, num_rows:] == 77).all())  # nothing past the bucket written


def test_decode_inputs_reject_bad_shapes():
    sent = torch.zeros((2, 4), dtype=torch.long)
    table = torch.zeros((4, 3), dtype=torch.long)
    with pytest.raises(ValueError, match="out must be"):
        decode_inputs(sent, torch.zeros(2, dtype=torch.long), table, 4, torch.zeros((4, 3)))
    with pytest.raises(ValueError, match="block_tables must be"):
        decode_inputs(sent, torch.zeros(2, dtype=torch.long), table[:2], 4, torch.zeros((4, 4)))
