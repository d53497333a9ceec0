"""Without CUDA, Triton kernels run in its interpreter. Triton reads TRITON_INTERPRET once, when it
is first imported, so it is set here, before any test module imports it (several modules also set
it, for when they run alone). Tests that start `k15` subprocesses remove it from their env."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
