"""Test-wide settings."""

import torch

# The test models are tiny: intra-op threads only add synchronisation, and on a loaded 2-core
# machine OpenMP spin-waiting makes each small op tens of times slower.
torch.set_num_threads(1)
