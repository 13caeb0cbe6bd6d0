"""Test-wide settings."""

import os

import torch

# Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors; the variable
# must be set before any kernel is decorated (imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The test models are tiny: intra-op threads only add synchronisation, and on a loaded 2-core
# machine OpenMP spin-waiting makes each small op tens of times slower.
torch.set_num_threads(1)
