"""Without CUDA, Triton kernels run in its interpreter. Triton reads TRITON_INTERPRET once, when it
is first imported, so it is set here, before any test module imports it (several modules also set
it, for when they run alone). Tests that start `k15` subprocesses remove it from their env."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def packed_batch():
    """make(seed, k=4, groups=3, device="cpu") -> (logp, old_logp, seq_ids, rewards, k): a policy
    loss's packed inputs, k sequences per group of 1-5 tokens each, a fifth of tokens left out (-1)."""
    def make(seed, k=4, groups=3, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        S = k * groups
        lengths = torch.randint(1, 6, (S,), generator=g)
        seq = torch.repeat_interleave(torch.arange(S), lengths)
        seq[torch.rand(seq.shape, generator=g) < 0.2] = -1
        logp = -torch.rand(seq.shape, generator=g) * 3
        old = logp + 0.3 * torch.randn(seq.shape, generator=g)
        rewards = (torch.rand(S, generator=g) > 0.5).float()
        return logp.to(device), old.to(device), seq.to(device), rewards.to(device), k
    return make
